"""LoRA training on one device: datasets from zips and directories, the flow-matching LoRA trainer."""
