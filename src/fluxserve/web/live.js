// A running job as people follow it: the latest preview image (asked for with X-Fluxserve-Previews; each preview
// comes as a status log entry's preview_url), the step counter, the time elapsed and an estimate of the time
// left from the observed step rate, and the Result panel's status in plain words.

import { h } from "./lib.js";

export const PREVIEWS = 3;  // preview images asked for per job (the most the server makes)
const STEP_RE = /step\s+(\d+)\s*\/\s*(\d+)/i;

export const queueText = (position) => (position > 0 ? `In queue · ${position} ahead` : "In queue · next");

export function roundSeconds(seconds) {
  if (seconds < 60) return `${Math.max(1, Math.ceil(seconds))} s`;
  return `${Math.ceil(seconds / 60)} min`;
}

const elapsedText = (ms) => `${(ms / 1000).toFixed(1)} s`;

// The preview figure, made once and placed above the images.
function previewFigure() {
  let figure = document.getElementById("preview");
  if (!figure) {
    figure = h("figure", { id: "preview", class: "preview", hidden: true },
      h("img", { id: "preview-image", alt: "Preview of the image being generated" }),
      h("figcaption", { id: "preview-caption" }));
    document.getElementById("images").before(figure);
  }
  return figure;
}

function infoLine() {
  let line = document.getElementById("live-info");
  if (!line) {
    line = h("p", { id: "live-info", class: "live-info", hidden: true });
    document.getElementById("progress").after(line);
  }
  return line;
}

// One job's progress: feed it the status log entries (``observe``), read the words for the status line.
export class LiveJob {
  constructor() {
    this.started = performance.now();
    this.steps = [];  // [step, total, time in ms] from the log entries' timestamps
    this.preview = null;
    this.previewStep = 0;
    this.timer = setInterval(() => this.showInfo(), 500);
    this.showInfo();
  }

  // Record the steps and the newest preview of a batch of log entries; returns the last [step, total] seen.
  observe(logs) {
    let last = null;
    for (const line of logs || []) {
      const match = STEP_RE.exec(line.message || "");
      if (!match) continue;
      last = [Number(match[1]), Number(match[2])];
      const at = Date.parse(line.timestamp);
      this.steps.push([...last, Number.isNaN(at) ? Date.now() : at]);
      if (line.preview_url) this.showPreview(line.preview_url, last);
    }
    if (last) this.showInfo();
    return last;
  }

  showPreview(url, [step, total]) {
    const figure = previewFigure();
    figure.querySelector("img").src = url;
    figure.querySelector("figcaption").textContent = `Preview · step ${step} of ${total}`;
    figure.hidden = false;
    this.preview = url;
    this.previewStep = step;
  }

  // Seconds left from the step rate between the first and the last step seen (needs two different steps).
  secondsLeft() {
    if (this.steps.length < 2) return null;
    const [firstStep, , firstAt] = this.steps[0];
    const [step, total, at] = this.steps[this.steps.length - 1];
    if (step <= firstStep || at <= firstAt) return null;
    return ((at - firstAt) / (step - firstStep)) * (total - step) / 1000;
  }

  etaText() {
    const left = this.secondsLeft();
    return left === null ? "" : `about ${roundSeconds(left)} left`;
  }

  statusText() {
    const last = this.steps[this.steps.length - 1];
    if (!last) return "Generating…";
    return ["Generating", `step ${last[0]} of ${last[1]}`, this.etaText()].filter(Boolean).join(" · ");
  }

  showInfo() {
    const line = infoLine();
    line.hidden = false;
    line.textContent = `${elapsedText(performance.now() - this.started)} elapsed`;
  }

  // The job ended: stop the clock (the line keeps the total time).
  stop() {
    clearInterval(this.timer);
    infoLine().textContent = `Took ${elapsedText(performance.now() - this.started)}`;
  }
}

// The final images fade in over the last preview, which then goes away.
export function revealOutput(job) {
  const figure = document.getElementById("preview");
  const first = document.querySelector("#images .image img");
  if (figure) figure.hidden = true;
  if (!first || !job?.preview) return;
  first.parentElement.style.backgroundImage = `url("${job.preview}")`;
  first.parentElement.classList.add("from-preview");
  first.classList.add("fading");
  const show = () => requestAnimationFrame(() => first.classList.remove("fading"));
  if (first.complete) show(); else first.addEventListener("load", show, { once: true });
}

// A new job or another job's output: no preview, no timing line.
export function resetLive() {
  const figure = document.getElementById("preview");
  if (figure) { figure.hidden = true; figure.querySelector("img").removeAttribute("src"); }
  const line = document.getElementById("live-info");
  if (line) line.hidden = true;
}
