"""The parts of ``benchmarks/gpu_run.py``, one module each (``gpu_parts.common`` says what a part is)."""
