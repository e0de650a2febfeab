// fluxserve playground, the page's main module (no dependencies; lib.js holds the shared helpers). It talks to the server like any fal client does:
// GET /api/endpoints and the per-endpoint OpenAPI document (the form), POST /queue/{endpoint} (submit),
// GET .../status/stream?logs=1 (progress, SSE read through fetch so the Authorization header goes along),
// GET response_url (the output), PUT cancel_url (cancel); history.js reads fal's request history for the sidebar,
// gallery.js reads /api/history.

import { endpointGroups, endpointNote, showDemoBanner } from "./endpoints.js";
import { refreshGallery, setupGallery } from "./gallery.js";
import { errorText, loadHistory, setupHistory, showFailure, statusOf } from "./history.js";
import { HttpError, KEY_STORAGE, api, describe, getJSON, h, onUnauthorized, sse } from "./lib.js";
import { LiveJob, PREVIEWS, queueText, resetLive, revealOutput } from "./live.js";
import { referencesField } from "./refs.js";
import { setupCodeDialog } from "./snippets.js";

const ENDPOINT_STORAGE = "fluxserve.endpoint";
const PREFERRED_ENDPOINT = "fal-ai/flux-2/flash";
const HIDDEN_FIELDS = new Set(["sync_mode"]); // the playground keeps outputs, so history can show them
const FIELD_ORDER = ["prompt", "image_urls", "image_size", "seed", "num_images", "num_inference_steps",
  "guidance_scale", "output_format", "acceleration", "safety_tolerance", "loras"];
const SIZE_LABELS = {
  auto: "auto (first reference's size)", square_hd: "square HD · 1024×1024", square: "square · 512×512",
  portrait_4_3: "portrait 3:4 · 768×1024", portrait_16_9: "portrait 9:16 · 576×1024",
  landscape_4_3: "landscape 4:3 · 1024×768", landscape_16_9: "landscape 16:9 · 1024×576",
};

const $ = (id) => document.getElementById(id);
const state = {
  endpoints: [], schema: null, components: {}, fields: new Map(), job: null, abort: null,
  historyTimer: null, formLoads: 0, endpoint: null,
};

// ---- API key ----------------------------------------------------------------------------------------------------
function showKeyPanel(message) {
  $("key-panel").hidden = false;
  $("key-toggle").setAttribute("aria-expanded", "true");
  $("key-message").textContent = message || "";
  $("key-input").value = localStorage.getItem(KEY_STORAGE) || "";
  if (message) $("key-input").focus();
}

function setupKey() {
  onUnauthorized(showKeyPanel);
  $("key-toggle").addEventListener("click", () => {
    const open = $("key-panel").hidden;
    if (open) showKeyPanel("");
    else { $("key-panel").hidden = true; $("key-toggle").setAttribute("aria-expanded", "false"); }
  });
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    $("key-message").textContent = "Checking…";
    try {
      await loadHistory();
      refreshGallery();
      $("key-message").textContent = "";
      $("key-panel").hidden = true;
      $("key-toggle").setAttribute("aria-expanded", "false");
      setStatus(key ? "Key saved." : "Key removed.");
    } catch (error) {
      if (!(error instanceof HttpError && error.status === 401)) $("key-message").textContent = error.message;
    }
  });
  $("key-clear").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    $("key-input").value = "";
    $("key-message").textContent = "Key forgotten.";
  });
}

// ---- endpoints and their schemas --------------------------------------------------------------------------------
async function loadEndpoints() {
  state.endpoints = (await getJSON("/api/endpoints")).filter((e) => ["text-to-image", "edit"].includes(e.task));
  const select = $("endpoint");
  select.replaceChildren(...endpointGroups(state.endpoints));
  const ids = state.endpoints.map((e) => e.endpoint_id);
  const saved = localStorage.getItem(ENDPOINT_STORAGE);
  select.value = ids.includes(saved) ? saved : ids.includes(PREFERRED_ENDPOINT) ? PREFERRED_ENDPOINT : ids[0];
  select.addEventListener("change", () => {
    if (select.value === $("fields").dataset.endpoint) return;
    localStorage.setItem(ENDPOINT_STORAGE, select.value);
    loadForm(select.value).catch(showError);
  });
  await loadForm(select.value);
}

function resolve(schema) {
  if (schema && schema.$ref) return resolve(state.components[schema.$ref.split("/").pop()]);
  return schema || {};
}

async function loadForm(endpointId, values = null) {
  const load = ++state.formLoads;  // a slower earlier load must not overwrite a later one
  $("fields").dataset.endpoint = "";
  const doc = await getJSON(`/api/openapi/queue/openapi.json?endpoint_id=${encodeURIComponent(endpointId)}`);
  if (load !== state.formLoads) return;
  state.components = doc.components?.schemas || {};
  const body = doc.paths[`/${endpointId}`].post.requestBody.content["application/json"].schema;
  state.schema = resolve(body);
  const info = state.endpoints.find((e) => e.endpoint_id === endpointId);
  state.endpoint = info;
  const details = [info && endpointNote(info), state.schema.description !== info?.title && state.schema.description,
    info && `model: ${info.model}`].filter(Boolean);
  $("endpoint-info").replaceChildren(h("span", { class: "mono", id: "endpoint-id" }, endpointId),
    ...details.map((detail) => ` · ${detail}`));
  renderForm(values);
  $("fields").dataset.endpoint = endpointId;
}

function orderedProperties(schema) {
  const names = Object.keys(schema.properties || {}).filter((n) => !HIDDEN_FIELDS.has(n));
  const rank = (n) => {
    const i = FIELD_ORDER.indexOf(n);
    if (i >= 0) return i;
    return resolve(schema.properties[n]).type === "boolean" ? 1000 : 500;
  };
  return names.sort((a, b) => rank(a) - rank(b));
}

function renderForm(values) {
  const container = $("fields");
  container.replaceChildren();
  state.fields = new Map();
  clearErrors();
  const required = new Set(state.schema.required || []);
  const toggles = h("div", { class: "toggles" });
  for (const name of orderedProperties(state.schema)) {
    const prop = state.schema.properties[name];
    const field = makeField(name, prop, required.has(name));
    state.fields.set(name, field);
    (field.kind === "boolean" ? toggles : container).append(field.el);
  }
  if (toggles.children.length) container.append(toggles);
  if (values) fillForm(values);
}

const LABELS = { image_urls: "Reference images", num_images: "Images", num_inference_steps: "Steps" };
const titleOf = (name, prop) =>
  LABELS[name] || prop.title || name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());

// One labelled field: the control, its description (shown, or only to screen readers and as a tooltip for the
// compact half-width fields) and its error line.
function wrap(name, prop, control, { required = false, hint = true, kind = "", compact = false, range = "" } = {}) {
  const errorId = `err-${name}`;
  const hintId = `hint-${name}`;
  const classes = `field field-${kind || "plain"}${compact ? " compact" : ""}`;
  const el = h("div", { class: classes, id: `field-${name}`, "data-field": name },
    h("label", { for: `in-${name}`, title: compact ? prop.description : undefined }, titleOf(name, prop),
      required ? h("span", { class: "req", "aria-hidden": "true" }, " *") : null,
      range ? h("span", { class: "range" }, ` ${range}`) : null),
    control,
    hint && prop.description
      ? h("p", { class: compact ? "visually-hidden" : "hint", id: hintId }, prop.description) : null,
    h("p", { class: "field-error", id: errorId, hidden: true }),
  );
  for (const input of el.querySelectorAll("input, select, textarea")) {
    input.setAttribute("aria-describedby", [hint && prop.description ? hintId : "", errorId].join(" ").trim());
  }
  return el;
}

function makeField(name, rawProp, required) {
  const prop = rawProp;
  const variants = (prop.anyOf || []).map(resolve);
  const nonNull = variants.filter((v) => v.type !== "null");
  if (name === "image_size") return sizeField(name, prop, variants);
  if (name === "image_urls") return referencesField(name, prop, required, wrap, state.endpoint);
  const schema = nonNull.length === 1 ? { ...nonNull[0], ...prop, type: nonNull[0].type } : resolve(prop);
  if (schema.type === "boolean") {
    const input = h("input", { type: "checkbox", id: `in-${name}`, name, checked: schema.default === true });
    const el = h("div", { class: "field field-boolean", id: `field-${name}`, "data-field": name },
      h("label", { class: "switch", title: prop.description || "" }, input, h("span", {}, titleOf(name, prop))),
      h("p", { class: "field-error", id: `err-${name}`, hidden: true }));
    input.setAttribute("aria-describedby", `err-${name}`);
    return { kind: "boolean", el, get: () => input.checked, set: (v) => { input.checked = Boolean(v); } };
  }
  if (schema.enum) {
    const select = h("select", { id: `in-${name}`, name },
      schema.enum.map((v) => h("option", { value: String(v) }, String(v))));
    if (schema.default !== undefined) select.value = String(schema.default);
    const numeric = schema.type === "integer" || schema.type === "number";
    return { kind: "enum", el: wrap(name, prop, select, { required, compact: true }),
      get: () => (numeric ? Number(select.value) : select.value), set: (v) => { select.value = String(v); } };
  }
  if (schema.type === "integer" || schema.type === "number") {
    const nullable = prop.nullable === true || nonNull.length !== variants.length; // OpenAPI 3.0 or 3.1
    const input = h("input", {
      type: "number", id: `in-${name}`, name, inputmode: schema.type === "integer" ? "numeric" : "decimal",
      min: schema.minimum ?? undefined, max: schema.maximum ?? undefined,
      step: schema.type === "integer" ? "1" : "any",
      placeholder: nullable ? (name === "seed" ? "random" : "default") : undefined,
    });
    if (schema.default !== undefined && schema.default !== null) input.value = String(schema.default);
    const range = schema.minimum !== undefined && schema.maximum !== undefined
      ? `${schema.minimum}–${schema.maximum}` : "";
    const isSeed = name === "seed";
    const control = isSeed
      ? h("div", { class: "number-row" }, input,
        h("button", { type: "button", class: "secondary small", "aria-label": "Random seed",
          onclick: () => { input.value = String(Math.floor(Math.random() * 2 ** 31)); } }, "Random"),
        h("button", { type: "button", class: "secondary small", "aria-label": "Clear the seed",
          onclick: () => { input.value = ""; } }, "Clear"))
      : input;
    return { kind: "number", el: wrap(name, prop, control, { required, compact: !isSeed, range }),
      get: () => (input.value.trim() === "" ? undefined : Number(input.value)),
      set: (v) => { input.value = v === null || v === undefined ? "" : String(v); } };
  }
  if (schema.type === "string") {
    const isPrompt = name === "prompt";
    const input = isPrompt
      ? h("textarea", { id: `in-${name}`, name, rows: 4, placeholder: schema.example ?? schema.examples?.[0] ?? "", required })
      : h("input", { type: "text", id: `in-${name}`, name, required });
    if (schema.default !== undefined && schema.default !== null) input.value = String(schema.default);
    return { kind: "string", el: wrap(name, prop, input, { required, kind: isPrompt ? "prompt" : "" }),
      get: () => (input.value === "" && !required ? undefined : input.value), set: (v) => { input.value = v ?? ""; } };
  }
  // arrays of objects (loras) and anything else: JSON
  const area = h("textarea", { id: `in-${name}`, name, rows: 3, class: "mono",
    placeholder: name === "loras" ? '[{"path": "https://…/lora.safetensors", "scale": 1}]' : "JSON" });
  return { kind: "json", el: wrap(name, prop, area, { required }),
    get: () => {
      if (!area.value.trim()) return undefined;
      try { return JSON.parse(area.value); } catch (error) { throw new FieldError(name, `Invalid JSON: ${error.message}`); }
    },
    set: (v) => { area.value = v === undefined || v === null ? "" : JSON.stringify(v, null, 1); } };
}

class FieldError extends Error {
  constructor(field, message) { super(message); this.field = field; }
}

function sizeField(name, prop, variants) {
  const enumVariant = variants.find((v) => v.enum);
  const objectVariant = variants.find((v) => v.type === "object");
  const options = enumVariant ? enumVariant.enum : [];
  const select = h("select", { id: `in-${name}`, name },
    options.map((v) => h("option", { value: v }, SIZE_LABELS[v] || v)),
    objectVariant ? h("option", { value: "custom" }, "custom width × height") : null);
  select.value = prop.default && options.includes(prop.default) ? prop.default : options[0] || "custom";
  const dims = objectVariant?.properties || {};
  const dim = (d) => h("input", { type: "number", id: `in-${name}-${d}`, name: `${name}.${d}`, step: "16",
    min: dims[d]?.minimum, max: dims[d]?.maximum, value: String(dims[d]?.default ?? 1024), "aria-label": d });
  const width = dim("width");
  const height = dim("height");
  const custom = h("div", { class: "size-custom", hidden: select.value !== "custom" },
    h("label", { for: width.id }, "W"), width, h("span", { "aria-hidden": "true" }, "×"),
    h("label", { for: height.id }, "H"), height);
  select.addEventListener("change", () => { custom.hidden = select.value !== "custom"; });
  const el = wrap(name, prop, h("div", { class: "size-row" }, select, custom), { hint: false });
  return { kind: "size", el,
    get: () => (select.value === "custom"
      ? { width: Number(width.value), height: Number(height.value) } : select.value),
    set: (v) => {
      if (v && typeof v === "object") {
        select.value = "custom"; width.value = String(v.width); height.value = String(v.height);
      } else if (v) select.value = v;
      custom.hidden = select.value !== "custom";
    } };
}

function collect() {
  const input = {};
  for (const [name, field] of state.fields) {
    const value = field.get();
    if (value !== undefined) input[name] = value;
  }
  return input;
}

// The form as "Copy as code" needs it: the endpoint, the input Generate would submit, the endpoint's catalogue
// entry and the schema's defaults; null (with the field marked) when a field cannot be read.
function currentRequest() {
  clearErrors();
  const endpointId = $("fields").dataset.endpoint;
  if (!endpointId) return null;
  try {
    const defaults = Object.fromEntries(Object.entries(state.schema.properties || {})
      .map(([name, prop]) => [name, prop.default]));
    const info = { ...state.endpoints.find((e) => e.endpoint_id === endpointId), defaults };
    return { endpointId, input: collect(), info };
  } catch (error) {
    if (error instanceof FieldError) { showFieldError(error.field, error.message); return null; }
    throw error;
  }
}

function fillForm(values) {
  for (const [name, value] of Object.entries(values || {})) state.fields.get(name)?.set(value);
}

// ---- errors -----------------------------------------------------------------------------------------------------
// Editing a field clears its own error; any change clears the general error box.
function clearOnChange(event) {
  const field = event.target.closest?.(".field");
  const box = field && $(`err-${field.dataset.field}`);
  if (box && !box.hidden) {
    box.hidden = true;
    box.textContent = "";
    field.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
  }
  $("form-errors").hidden = true;
  $("form-errors").replaceChildren();
}

function clearErrors() {
  for (const el of document.querySelectorAll(".field-error")) { el.hidden = true; el.textContent = ""; }
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  $("form-errors").hidden = true;
  $("form-errors").replaceChildren();
}

function showFieldError(name, message) {
  const box = $(`err-${name}`);
  if (!box) return false;
  box.textContent = box.textContent ? `${box.textContent} ${message}` : message;
  box.hidden = false;
  box.closest(".field")?.querySelectorAll("input, select, textarea")
    .forEach((i) => i.setAttribute("aria-invalid", "true"));
  return true;
}

function showFormErrors(messages) {
  const box = $("form-errors");
  box.replaceChildren(h("ul", {}, messages.map((m) => h("li", {}, m))));
  box.hidden = false;
}

function showValidation(detail) {
  const general = [];
  for (const entry of Array.isArray(detail) ? detail : [{ loc: [], msg: String(detail) }]) {
    const loc = (entry.loc || []).filter((p) => p !== "body");
    const field = loc[0];
    const sub = loc.slice(1).join(".");
    const message = sub ? `${sub}: ${entry.msg}` : entry.msg;
    if (!(field !== undefined && showFieldError(String(field), message))) {
      general.push(field !== undefined ? `${loc.join(".")}: ${entry.msg}` : entry.msg);
    }
  }
  const first = document.querySelector("[aria-invalid='true']");
  if (first) first.focus();
  if (general.length) showFormErrors(general);
  setStatus("The server rejected the input (422): see the marked fields.", "error");
}

function showError(error) {
  if (error instanceof HttpError && error.status === 401) {
    setStatus("Unauthorized (401): enter a valid API key above.", "error");
  } else if (error.name !== "AbortError") {
    setStatus(error.message || String(error), "error");
  }
}

// ---- a job ------------------------------------------------------------------------------------------------------
function setStatus(text, tone = "") {
  const el = $("status");
  el.textContent = text;
  el.dataset.tone = tone;
}

function setProgress(step, total) {
  const bar = $("progress");
  bar.hidden = false;
  if (total) { bar.max = total; bar.value = step; bar.setAttribute("aria-valuetext", `step ${step} of ${total}`); }
  else bar.removeAttribute("value");  // indeterminate
  bar.dataset.step = String(step ?? "");
}

function resetResult(jobId) {
  $("job-id").textContent = jobId || "";
  $("images").replaceChildren();
  $("meta").hidden = true;
  $("meta").replaceChildren();
  $("logs").replaceChildren();
  $("logs-box").hidden = true;
  $("params-box").hidden = true;
  $("progress").hidden = true;
  $("progress").value = 0;
  resetLive();
}

function addLogs(logs) {
  for (const line of logs || []) $("logs").append(h("li", {}, line.message));
  if (logs?.length) $("logs-box").hidden = false;
}

function busy(on) {
  $("generate").disabled = on;
  $("cancel").disabled = !on;
  $("generate").textContent = on ? "Generating…" : "Generate";
}

async function submit(event) {
  event.preventDefault();
  if (state.job) return;
  clearErrors();
  const endpointId = $("endpoint").value;
  let input;
  try { input = collect(); } catch (error) {
    if (error instanceof FieldError) { showFieldError(error.field, error.message); return; }
    throw error;
  }
  const problems = [...state.fields].map(([name, field]) => [name, field.problem?.()]).filter(([, p]) => p);
  if (problems.length) {
    for (const [name, problem] of problems) showFieldError(name, problem);
    setStatus("Not sent: see the marked fields.", "error");
    return;
  }
  resetResult();
  setStatus("Submitting…");
  busy(true);
  try {
    const queued = await getJSON(`/queue/${endpointId}`,
      { method: "POST", json: input, headers: { "X-Fluxserve-Previews": String(PREVIEWS) } });
    refreshHistorySoon();
    await follow({ ...queued, endpoint: endpointId, input });
  } catch (error) {
    if (error instanceof HttpError && error.status === 422) showValidation(error.body?.detail ?? error.message);
    else showError(error);
  } finally {
    state.job = null;
    busy(false);
    refreshHistorySoon();
  }
}

// Follow a queued fal request to its end: status stream (logs -> progress bar), then its output.
async function follow(job) {
  state.job = job;
  state.abort = new AbortController();
  $("job-id").textContent = job.request_id;
  showParams({ endpoint: job.endpoint, dialect: "fal", input: job.input });
  setStatus("In queue…");
  setProgress(0, 0);
  const live = new LiveJob();
  let final = null;
  try {
    try {
      for await (const status of sse(`${job.status_url}/stream?logs=1`, state.abort.signal)) {
        final = onStatus(status, live) || final;
        if (final) break;
      }
    } catch (error) {
      if (error.name === "AbortError") return;
      if (!(error instanceof TypeError)) throw error;
    }
    while (!final) {  // the stream ended early (a proxy, a restart): poll
      await new Promise((r) => setTimeout(r, 500));
      final = onStatus(await getJSON(`${job.status_url}?logs=1`), live);
    }
  } finally { live.stop(); }
  if (final.error) {
    const cancelled = final.error_type === "request_cancelled" || /cancel/i.test(final.error);
    setStatus(cancelled ? "Cancelled" : `Failed: ${final.error}`, cancelled ? "" : "error");
    $("progress").hidden = true;
    return;
  }
  setStatus("Fetching the output…");
  const output = await getJSON(job.response_url);
  showOutput(output, final.metrics);
  revealOutput(live);
}

function onStatus(status, live) {
  if (status.status === "IN_QUEUE") {
    setStatus(queueText(status.queue_position ?? 0));
    return null;
  }
  addLogs(status.logs);
  const step = live.observe(status.logs);
  if (step) setProgress(step[0], step[1]);
  if (status.status === "IN_PROGRESS") {
    setStatus(live.statusText());
    return null;
  }
  if (status.status === "COMPLETED") {
    if (!status.error) { const bar = $("progress"); if (bar.max) bar.value = bar.max; }
    return status;
  }
  return null;
}

async function cancel() {
  const job = state.job;
  if (!job?.cancel_url) return;
  $("cancel").disabled = true;
  try {
    const response = await api(job.cancel_url, { method: "PUT" });
    const body = await response.json();
    setStatus(body.status === "CANCELLATION_REQUESTED" ? "Cancelling…" : body.status);
  } catch (error) {
    if (error instanceof HttpError && error.status === 400) setStatus("Already completed.");
    else showError(error);
  }
}

// ---- output -----------------------------------------------------------------------------------------------------
const fmtSeconds = (s) => (typeof s === "number" ? `${s < 10 ? s.toFixed(2) : s.toFixed(1)} s` : "");

function showOutput(output, metrics, jobId = $("job-id").textContent) {
  const images = output.images || [];
  const nsfw = output.has_nsfw_concepts || [];
  const prompt = output.prompt || "";
  $("images").replaceChildren(...images.map((image, i) => {
    const ext = (image.content_type || "image/png").split("/").pop().replace("jpeg", "jpg");
    return h("figure", { class: "image" },
      h("a", { href: image.url, target: "_blank", rel: "noopener" },
        h("img", { src: image.url, alt: `Generated image ${i + 1} of ${images.length}${prompt ? `: ${prompt}` : ""}`,
          width: image.width || undefined, height: image.height || undefined, decoding: "async" })),
      h("figcaption", {},
        h("span", {}, `${image.width ?? "?"}×${image.height ?? "?"} · ${image.content_type || ""}`),
        nsfw[i] ? h("span", { class: "badge warn" }, "flagged by the safety checker") : null,
        h("a", { href: image.url, download: `fluxserve-${jobId || "image"}-${i + 1}.${ext}` }, "Download")));
  }));
  const timings = output.timings || {};
  const rows = [["Seed", output.seed], ["Images", images.length]];
  const total = timings.inference ?? metrics?.inference_time;
  if (total !== undefined) rows.push(["Inference", fmtSeconds(total)]);
  for (const key of ["text_encoding", "denoising", "decoding", "safety", "encoding"]) {
    if (typeof timings[key] === "number") rows.push([key.replace("_", " "), fmtSeconds(timings[key])]);
  }
  $("meta").replaceChildren(...rows.filter(([, v]) => v !== undefined && v !== null)
    .flatMap(([k, v]) => [h("dt", {}, k), h("dd", { "data-meta": k.toLowerCase() }, String(v))]));
  $("meta").hidden = false;
  setStatus(images.length ? "Completed" : "Completed (no images)", "ok");
}

// params: {endpoint, dialect (when known), input}.
function showParams(params) {
  $("params").textContent = JSON.stringify(params, (k, v) =>
    (typeof v === "string" && v.startsWith("data:") && v.length > 120 ? `${v.slice(0, 60)}… (${v.length} chars)` : v), 2);
  $("params-box").hidden = false;
}

// ---- opening a past job (the History sidebar's fal requests, the gallery's jobs) ------------------------------
// job: {id, endpoint, status, error, input (fills the form: a fal request of a playground endpoint, else null),
// carry (what the current form takes over otherwise), params (the Parameters box), output, followable}.
async function openJob(job) {
  if (state.job) return;
  resetResult(job.id);
  if (job.input) {
    if ($("endpoint").value !== job.endpoint) {
      $("endpoint").value = job.endpoint;
      localStorage.setItem(ENDPOINT_STORAGE, job.endpoint);
    }
    await loadForm(job.endpoint, job.input);
  } else if (job.carry) {
    fillForm(Object.fromEntries(Object.entries(job.carry).filter(([, v]) => v !== undefined && v !== null)));
  }
  showParams(job.params);
  if (job.followable && (job.status === "queued" || job.status === "running")) {
    const base = `${location.origin}/queue/${job.endpoint.split("/").slice(0, 2).join("/")}/requests/${job.id}`;
    busy(true);
    try {
      await follow({ request_id: job.id, endpoint: job.endpoint, input: job.input, status_url: `${base}/status`,
        response_url: base, cancel_url: `${base}/cancel` });
    } finally { state.job = null; busy(false); refreshHistorySoon(); }
    return;
  }
  if (job.status === "completed") showOutput(job.output, null, job.id);
  else setStatus(`${job.status}${job.error ? `: ${job.error}` : ""}`, job.status === "failed" ? "error" : "");
}

// An /api/history item (the gallery), which names its dialect and the canonical request.
function fromGallery(item) {
  const isFal = item.dialect === "fal" && state.endpoints.some((e) => e.endpoint_id === item.endpoint);
  const r = item.request || {};
  return { id: item.id, endpoint: item.endpoint, status: item.status, error: item.error, followable: isFal,
    input: isFal ? item.input : null,
    carry: { prompt: r.prompt, seed: r.seed, num_images: r.num_images, output_format: r.output_format,
      image_size: r.width && r.height ? { width: r.width, height: r.height } : undefined },
    params: { endpoint: item.endpoint, dialect: item.dialect, input: item.input ?? item.request },
    output: { images: item.images, seed: item.seed, timings: item.timings || {}, prompt: item.prompt } };
}

// Whether an input is one of the endpoint's own fal inputs: a playground endpoint whose schema has every field.
// OpenAI's and Replicate's requests keep their own bodies (model and size, aspect_ratio, num_outputs…).
async function fitsForm(endpointId, input) {
  if (!input || !state.endpoints.some((e) => e.endpoint_id === endpointId)) return false;
  const doc = await getJSON(`/api/openapi/queue/openapi.json?endpoint_id=${encodeURIComponent(endpointId)}`);
  const deref = (s) => (s?.$ref ? deref(doc.components.schemas[s.$ref.split("/").pop()]) : s || {});
  const body = deref(doc.paths[`/${endpointId}`].post.requestBody.content["application/json"].schema);
  return Object.keys(input).every((name) => name in (body.properties || {}));
}

// A fal request history item: fal's fields only (json_input as sent, json_output as answered).
async function fromFal(item) {
  const input = item.json_input;
  const fits = await fitsForm(item.endpoint_id, input);
  const output = item.json_output || {};
  const image = output.images?.[0];
  return { id: item.request_id, endpoint: item.endpoint_id, status: statusOf(item), error: errorText(item),
    followable: fits, input: fits ? input : null,
    carry: input && { prompt: input.prompt, seed: input.seed,
      num_images: input.num_images ?? input.n ?? input.num_outputs,  // fal, OpenAI, Replicate
      image_size: image?.width && image?.height ? { width: image.width, height: image.height } : undefined },
    params: { endpoint: item.endpoint_id, input },
    output: { images: output.images || [], seed: output.seed, timings: output.timings || {}, prompt: output.prompt } };
}

function refreshHistorySoon() {
  clearTimeout(state.historyTimer);
  state.historyTimer = setTimeout(() => { loadHistory().catch(() => {}); refreshGallery(); }, 100);
}

// ---- start ------------------------------------------------------------------------------------------------------
async function main() {
  setupKey();
  showDemoBanner();
  $("gen-form").addEventListener("input", clearOnChange);
  $("gen-form").addEventListener("change", clearOnChange);
  $("gen-form").addEventListener("submit", (e) => submit(e).catch(showError));
  $("cancel").addEventListener("click", () => cancel());
  setupCodeDialog($("copy-code"), currentRequest);
  $("history-refresh").addEventListener("click", () => { loadHistory().catch(showError); refreshGallery(); });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshHistorySoon(); });
  try { await loadEndpoints(); } catch (error) { showError(error); }
  setupHistory(state.endpoints.map((e) => e.endpoint_id), (item) => fromFal(item).then(openJob).catch(showError));
  try { await loadHistory(); } catch (error) { showFailure(error); }
  await setupGallery($("gallery-panel"), { use: (item) => openJob(fromGallery(item)),
    changed: () => loadHistory().catch(() => {}) });
  document.body.dataset.ready = "true";
}

main();
