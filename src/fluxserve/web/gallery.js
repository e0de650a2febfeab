// The playground's gallery: every image of the caller's past jobs (newest first, "Load older" paging), filtered
// by endpoint, API, status and prompt text on the server (GET /api/history), a lightbox (large image, prompt,
// parameters, previous/next, "Use these parameters", download, delete) and a side-by-side or slider comparison
// of two images with the parameters that differ.

import { HttpError, api, getJSON, h } from "./lib.js";

export const STATUS_LABELS = {
  queued: "In queue", running: "Running", completed: "Completed", failed: "Failed", cancelled: "Cancelled",
};
export const DIALECT_LABELS = { fal: "fal", openai: "OpenAI", replicate: "Replicate" };
const PAGE = 24;
const SEARCH_DELAY_MS = 300;

const $ = (id) => document.getElementById(id);
const state = {
  tiles: [], before: null, loads: 0, picks: [], currentKey: null, opener: null, searchTimer: null, endpoints: null,
  hooks: { use: async () => {}, changed: () => {} },
};

export const statusBadge = (status) => h("span", { class: `badge status-${status}` }, STATUS_LABELS[status] || status);
const dialectBadge = (dialect) => h("span", { class: "badge dialect" }, DIALECT_LABELS[dialect] || dialect);
const timeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

// ---- parameters of a job, as rows people read (and compare) ------------------------------------------------------
function parameters(item, image) {
  const r = item.request || {};
  const refs = (r.image_urls || []).length;
  const rows = [
    ["Endpoint", item.endpoint], ["API", DIALECT_LABELS[item.dialect] || item.dialect],
    ["Status", STATUS_LABELS[item.status] || item.status], ["Seed", item.seed],
    ["Size", image?.width ? `${image.width}×${image.height}` : r.width ? `${r.width}×${r.height}` : null],
    ["Steps", r.steps], ["Guidance", r.guidance], ["Images", r.num_images], ["Format", r.output_format],
    ["Acceleration", r.acceleration], ["Model", r.model], ["References", refs || null],
    ["LoRAs", (r.loras || []).map((l) => `${l.path.split("/").pop()} × ${l.scale}`).join(", ") || null],
    ["Created", item.created_at ? timeFormat.format(new Date(item.created_at)) : null],
  ];
  return rows.filter(([, value]) => value !== undefined && value !== null && value !== "");
}

// what a job without images shows instead: its status, or why a finished one has none
const placeholder = (item) => (item.status === "completed" ? (item.store_io ? "No images" : "Images not kept")
  : STATUS_LABELS[item.status] || item.status);
const promptOf = (item) => item.prompt || (item.store_io ? "(no prompt)" : "(input not stored)");

// ---- loading ------------------------------------------------------------------------------------------------------
function filters() {
  return { endpoint: $("gallery-endpoint").value, dialect: $("gallery-dialect").value,
    status: $("gallery-status-filter").value, q: $("gallery-search").value.trim() };
}

// one tile per image; a job without images (queued, running, failed, cancelled) gets one tile showing its status
const tilesOf = (item) => (item.images.length ? item.images : [null])
  .map((image, index) => ({ key: `${item.id}:${index}`, item, image, index }));

export async function refreshGallery(older = false) {
  if (!$("gallery-grid")) return;  // not set up yet
  const load = ++state.loads;  // a slower earlier answer must not overwrite a later one
  const params = new URLSearchParams({ limit: String(PAGE) });
  for (const [name, value] of Object.entries(filters())) if (value) params.set(name, value);
  if (older && state.before) params.set("before", state.before);
  let body;
  try { body = await getJSON(`/api/history?${params}`); } catch (error) {
    if (load === state.loads) say(error.status === 401 ? "Enter the API key to see the gallery." : error.message);
    return;
  }
  if (load !== state.loads) return;
  loadEndpointFilter();
  const tiles = body.items.flatMap(tilesOf);
  state.tiles = older ? [...state.tiles, ...tiles] : tiles;
  state.picks = state.picks.map((p) => state.tiles.find((t) => t.key === p.key)).filter(Boolean);
  state.before = body.next_before;
  if (older) $("gallery-grid").append(...tiles.map(tileElement));
  else $("gallery-grid").replaceChildren(...tiles.map(tileElement));
  $("gallery-more").hidden = !body.next_before;
  const filtered = Object.values(filters()).some(Boolean);
  say(state.tiles.length ? "" : filtered ? "Nothing matches these filters." : "No images yet.");
  showPicks();
  if ($("lightbox").open) renderLightbox();
}

function say(text) { $("gallery-status").textContent = text; }

function tileElement(tile) {
  const { item, image, key } = tile;
  const prompt = promptOf(item);
  const picked = state.picks.some((p) => p.key === key);
  return h("li", { class: "tile", "data-key": key, "data-job": item.id, "data-dialect": item.dialect,
    "data-status": item.status },
  h("button", { type: "button", class: "tile-open", title: prompt,
    "aria-label": `${prompt} · ${STATUS_LABELS[item.status] || item.status} · ${DIALECT_LABELS[item.dialect] || item.dialect}`,
    onclick: (event) => openLightbox(key, event.currentTarget) },
  image ? h("img", { src: image.url, alt: "", loading: "lazy", width: image.width, height: image.height })
    : h("span", { class: "tile-empty" }, placeholder(item))),
  h("div", { class: "tile-caption" },
    h("span", { class: "tile-prompt" }, prompt),
    h("span", { class: "tile-badges" }, statusBadge(item.status), dialectBadge(item.dialect),
      h("span", { class: "badge endpoint", title: item.endpoint }, item.endpoint.replace(/^fal-ai\//, "")))),
  image ? h("label", { class: "tile-pick" },
    h("input", { type: "checkbox", class: "compare-pick", checked: picked, onchange: () => togglePick(key),
      "aria-label": `Compare: ${prompt}` }),
    "Compare") : null);
}

// ---- lightbox -----------------------------------------------------------------------------------------------------
function openLightbox(key, opener) {
  state.currentKey = key;
  state.opener = opener || document.activeElement;
  renderLightbox();
  if (!$("lightbox").open) $("lightbox").showModal();
  $("lightbox-close").focus();
}

function step(delta) {
  const at = state.tiles.findIndex((t) => t.key === state.currentKey);
  const next = state.tiles[at + delta];
  if (!next) return;
  state.currentKey = next.key;
  renderLightbox();
}

function renderLightbox() {
  const at = state.tiles.findIndex((t) => t.key === state.currentKey);
  if (at < 0) { closeLightbox(); return; }  // no longer listed (deleted, filtered out)
  const { item, image, index } = state.tiles[at];
  $("lightbox-title").textContent = `${at + 1} of ${state.tiles.length}${state.before ? "+" : ""}`;
  $("lightbox-prev").disabled = at === 0;
  $("lightbox-next").disabled = at === state.tiles.length - 1;
  $("lightbox-figure").replaceChildren(image
    ? h("img", { id: "lightbox-image", src: image.url, alt: promptOf(item), width: image.width, height: image.height })
    : h("p", { class: "lightbox-empty" }, item.error || placeholder(item)));
  $("lightbox-badges").replaceChildren(statusBadge(item.status), dialectBadge(item.dialect),
    h("span", { class: "badge endpoint" }, item.endpoint));
  $("lightbox-prompt").textContent = promptOf(item);
  $("lightbox-params").replaceChildren(...parameters(item, image)
    .flatMap(([k, v]) => [h("dt", {}, k), h("dd", { "data-param": k.toLowerCase() }, String(v))]));
  const download = $("lightbox-download");
  download.hidden = !image;
  if (image) {
    const ext = (image.content_type || "image/png").split("/").pop().replace("jpeg", "jpg");
    download.href = image.url;
    download.download = `fluxserve-${item.id}-${index + 1}.${ext}`;
  }
  $("lightbox-pick").hidden = !image;
  showPicks();
  $("lightbox-delete").disabled = !["completed", "failed", "cancelled"].includes(item.status);
  $("lightbox-message").textContent = "";
}

function closeLightbox() { if ($("lightbox").open) $("lightbox").close(); }

function restoreFocus() {
  const opener = state.opener;
  state.opener = null;
  const tile = document.querySelector(`#gallery-grid .tile[data-key="${CSS.escape(state.currentKey || "")}"] .tile-open`);
  (opener?.isConnected ? opener : tile || $("gallery-grid"))?.focus();
}

async function useParameters() {
  const { item } = state.tiles.find((t) => t.key === state.currentKey);
  if ($("generate").disabled) {  // the form belongs to the generation under way
    $("lightbox-message").textContent = "Wait for the current generation to finish, or cancel it, first.";
    return;
  }
  closeLightbox();
  await state.hooks.use(item);
  $("gen-form").scrollIntoView({ block: "start" });
  $("in-prompt")?.focus({ preventScroll: true });
}

async function deleteCurrent() {
  const { item } = state.tiles.find((t) => t.key === state.currentKey);
  const count = item.images.length;
  const what = count > 1 ? `this job and its ${count} images` : count ? "this image" : "this job";
  if (!window.confirm(`Delete ${what}? This cannot be undone.`)) return;
  try {
    await api(`/api/history/${encodeURIComponent(item.id)}`, { method: "DELETE" });
  } catch (error) {
    $("lightbox-message").textContent = error instanceof HttpError ? error.message : String(error);
    return;
  }
  const at = state.tiles.findIndex((t) => t.key === state.currentKey);
  state.tiles = state.tiles.filter((t) => t.item.id !== item.id);
  state.picks = state.picks.filter((p) => p.item.id !== item.id);
  for (const el of document.querySelectorAll(`#gallery-grid .tile[data-job="${CSS.escape(item.id)}"]`)) el.remove();
  say(state.tiles.length ? "Deleted." : "Deleted. No images left here.");
  state.hooks.changed();
  const next = state.tiles[Math.min(at, state.tiles.length - 1)];
  state.currentKey = next?.key ?? null;
  state.opener = null;
  renderLightbox();  // the next image, or closed when none is left
  showPicks();
}

// ---- compare ------------------------------------------------------------------------------------------------------
function togglePick(key) {
  if (state.picks.some((p) => p.key === key)) state.picks = state.picks.filter((p) => p.key !== key);
  else state.picks = [...state.picks, state.tiles.find((t) => t.key === key)].slice(-2);  // a third replaces the oldest
  showPicks();
}

function clearPicks() {
  state.picks = [];
  showPicks();
}

function showPicks() {
  for (const box of document.querySelectorAll("#gallery-grid .compare-pick")) {
    box.checked = state.picks.some((p) => p.key === box.closest(".tile").dataset.key);
  }
  $("lightbox-pick")?.setAttribute("aria-pressed", String(state.picks.some((p) => p.key === state.currentKey)));
  const n = state.picks.length;
  $("gallery-compare-bar").hidden = n === 0;
  $("gallery-compare-count").textContent = n === 2 ? "2 images picked" : "1 image picked: pick one more to compare";
  $("gallery-compare").disabled = n !== 2;
}

function openCompare() {
  const [a, b] = state.picks;
  const rowsA = new Map(parameters(a.item, a.image));
  const rowsB = new Map(parameters(b.item, b.image));
  if (a.item.prompt !== b.item.prompt) {
    rowsA.set("Prompt", promptOf(a.item));
    rowsB.set("Prompt", promptOf(b.item));
  }
  const names = [...new Set([...rowsA.keys(), ...rowsB.keys()])].filter((k) => k !== "Created");
  const differing = names.filter((k) => String(rowsA.get(k) ?? "—") !== String(rowsB.get(k) ?? "—"));
  const figure = (tile, label) => h("figure", { class: "compare-figure" },
    h("img", { src: tile.image.url, alt: `${label}: ${promptOf(tile.item)}`, width: tile.image.width,
      height: tile.image.height }),
    h("figcaption", {}, h("strong", {}, label), " ", promptOf(tile.item)));
  $("compare-side").replaceChildren(figure(a, "A"), figure(b, "B"));
  $("compare-slider-view").style.setProperty("--ratio", String(a.image.width / a.image.height || 1));
  $("compare-slider-view").replaceChildren(
    h("img", { src: b.image.url, alt: `B: ${promptOf(b.item)}` }),
    h("img", { src: a.image.url, alt: `A: ${promptOf(a.item)}`, class: "compare-top", id: "compare-top" }));
  $("compare-diff").replaceChildren(differing.length
    ? h("table", { class: "compare-table" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Parameter"), h("th", { scope: "col" }, "A"),
        h("th", { scope: "col" }, "B"))),
      h("tbody", {}, differing.map((k) => h("tr", { "data-param": k.toLowerCase() }, h("th", { scope: "row" }, k),
        h("td", {}, String(rowsA.get(k) ?? "—")), h("td", {}, String(rowsB.get(k) ?? "—"))))))
    : h("p", { class: "hint" }, "Same parameters."));
  $("compare-reveal").value = "50";
  reveal();
  setCompareMode("side");
  state.opener = document.activeElement;
  $("compare").showModal();
  $("compare-close").focus();
}

function setCompareMode(mode) {
  $("compare-side").hidden = mode !== "side";
  $("compare-slider").hidden = mode !== "slider";
  $("compare-mode-side").setAttribute("aria-pressed", String(mode === "side"));
  $("compare-mode-slider").setAttribute("aria-pressed", String(mode === "slider"));
}

function reveal() {
  const top = $("compare-top");
  if (top) top.style.clipPath = `inset(0 ${100 - Number($("compare-reveal").value)}% 0 0)`;
}

// Tab and Shift+Tab cycle through a modal dialog's controls instead of leaving it for the browser's own.
function trapFocus(dialog) {
  dialog.addEventListener("keydown", (event) => {
    if (event.key !== "Tab") return;
    const controls = [...dialog.querySelectorAll("button, a[href], input, select, textarea, [tabindex]")]
      .filter((el) => !el.disabled && el.getClientRects().length && el.tabIndex >= 0);
    if (!controls.length) return;
    const first = controls[0];
    const last = controls[controls.length - 1];
    if (event.shiftKey && document.activeElement === first) { event.preventDefault(); last.focus(); }
    else if (!event.shiftKey && document.activeElement === last) { event.preventDefault(); first.focus(); }
  });
  return dialog;
}

// ---- the panel and its dialogs --------------------------------------------------------------------------------------
function select(id, label, options) {
  return h("label", { class: "gallery-filter" }, h("span", {}, label),
    h("select", { id }, options.map(([value, text]) => h("option", { value }, text))));
}

function buildPanel(panel) {
  panel.replaceChildren(
    h("div", { class: "panel-head" }, h("h2", { id: "gallery-title" }, "Gallery"),
      h("button", { type: "button", id: "gallery-refresh", class: "secondary small",
        onclick: () => refreshGallery() }, "Refresh")),
    h("form", { class: "gallery-filters", role: "search", "aria-label": "Filter the gallery",
      onsubmit: (event) => { event.preventDefault(); refreshGallery(); } },
    h("label", { class: "gallery-filter gallery-search" }, h("span", {}, "Search prompts"),
      h("input", { type: "search", id: "gallery-search", placeholder: "text in the prompt", autocomplete: "off",
        maxlength: 200 })),
    select("gallery-endpoint", "Endpoint", [["", "All endpoints"]]),
    select("gallery-dialect", "API", [["", "All APIs"], ...Object.entries(DIALECT_LABELS)]),
    select("gallery-status-filter", "Status", [["", "All statuses"], ...Object.entries(STATUS_LABELS)])),
    h("div", { id: "gallery-compare-bar", class: "compare-bar", hidden: true },
      h("span", { id: "gallery-compare-count" }),
      h("button", { type: "button", id: "gallery-compare", class: "primary small", onclick: openCompare }, "Compare"),
      h("button", { type: "button", class: "secondary small",
        onclick: clearPicks }, "Clear")),
    h("p", { id: "gallery-status", class: "hint", role: "status" }),
    h("ul", { id: "gallery-grid", class: "gallery-grid", tabindex: "-1", "aria-label": "Images" }),
    h("button", { type: "button", id: "gallery-more", class: "secondary small", hidden: true,
      onclick: () => refreshGallery(true) }, "Load older"));
}

function buildLightbox() {
  const box = h("dialog", { id: "lightbox", class: "lightbox", "aria-labelledby": "lightbox-heading" },
    h("div", { class: "dialog-head" },
      h("h2", { id: "lightbox-heading" }, "Image ", h("span", { id: "lightbox-title", class: "muted" })),
      h("button", { type: "button", id: "lightbox-close", class: "secondary small", onclick: closeLightbox },
        "Close")),
    h("div", { class: "lightbox-body" },
      h("div", { class: "lightbox-stage" },
        h("button", { type: "button", id: "lightbox-prev", class: "nav", "aria-label": "Previous image",
          onclick: () => step(-1) }, "‹"),
        h("div", { id: "lightbox-figure", class: "lightbox-figure" }),
        h("button", { type: "button", id: "lightbox-next", class: "nav", "aria-label": "Next image",
          onclick: () => step(1) }, "›")),
      h("div", { class: "lightbox-info" },
        h("div", { id: "lightbox-badges", class: "tile-badges" }),
        h("p", { id: "lightbox-prompt", class: "lightbox-prompt" }),
        h("dl", { id: "lightbox-params", class: "meta" }),
        h("p", { id: "lightbox-message", class: "field-error-text", role: "alert" }),
        h("div", { class: "lightbox-actions" },
          h("button", { type: "button", id: "lightbox-use", class: "primary small", onclick: () => useParameters() },
            "Use these parameters"),
          h("a", { id: "lightbox-download", class: "secondary small button-link" }, "Download"),
          h("button", { type: "button", id: "lightbox-pick", class: "secondary small", "aria-pressed": "false",
            onclick: () => togglePick(state.currentKey) }, "Compare"),
          h("button", { type: "button", id: "lightbox-delete", class: "danger small", onclick: () => deleteCurrent() },
            "Delete")))));
  box.addEventListener("keydown", (event) => {
    if (event.target.matches("input, textarea, select")) return;
    if (event.key === "ArrowLeft") { event.preventDefault(); step(-1); }
    if (event.key === "ArrowRight") { event.preventDefault(); step(1); }
  });
  box.addEventListener("close", restoreFocus);
  box.addEventListener("click", (event) => { if (event.target === box) closeLightbox(); });  // the backdrop
  return box;
}

function buildCompare() {
  const box = h("dialog", { id: "compare", class: "lightbox compare", "aria-labelledby": "compare-heading" },
    h("div", { class: "dialog-head" }, h("h2", { id: "compare-heading" }, "Compare"),
      h("div", { class: "compare-modes", role: "group", "aria-label": "View" },
        h("button", { type: "button", id: "compare-mode-side", class: "secondary small",
          onclick: () => setCompareMode("side") }, "Side by side"),
        h("button", { type: "button", id: "compare-mode-slider", class: "secondary small",
          onclick: () => setCompareMode("slider") }, "Slider")),
      h("button", { type: "button", id: "compare-close", class: "secondary small",
        onclick: () => $("compare").close() }, "Close")),
    h("div", { id: "compare-side", class: "compare-side" }),
    h("div", { id: "compare-slider", class: "compare-slider", hidden: true },
      h("div", { id: "compare-slider-view", class: "compare-slider-view" }),
      h("div", { class: "compare-reveal-row" }, h("strong", { "aria-hidden": "true" }, "A"),
        h("input", { type: "range", id: "compare-reveal", min: 0, max: 100, value: "50",
          "aria-label": "How much of image A to show", oninput: reveal }),
        h("strong", { "aria-hidden": "true" }, "B"))),
    h("h3", { class: "compare-diff-title" }, "Differences"),
    h("div", { id: "compare-diff", class: "compare-diff" }));
  box.addEventListener("close", () => { state.opener?.focus(); state.opener = null; });
  box.addEventListener("click", (event) => { if (event.target === box) box.close(); });
  return box;
}

// once: the endpoint filter's options (retried with the next load when it failed, e.g. before a key was given)
function loadEndpointFilter() {
  state.endpoints ??= getJSON("/api/endpoints").then((endpoints) => {
    $("gallery-endpoint").append(...endpoints.map((e) => h("option", { value: e.endpoint_id }, e.endpoint_id)));
  }).catch(() => { state.endpoints = null; });
}

// hooks.use(item): put a job's parameters into the form (and its output into the result panel);
// hooks.changed(): a job was deleted (the history list reloads).
export async function setupGallery(panel, hooks) {
  state.hooks = { ...state.hooks, ...hooks };
  buildPanel(panel);
  document.body.append(trapFocus(buildLightbox()), trapFocus(buildCompare()));
  for (const id of ["gallery-endpoint", "gallery-dialect", "gallery-status-filter"]) {
    $(id).addEventListener("change", () => refreshGallery());
  }
  $("gallery-search").addEventListener("input", () => {
    clearTimeout(state.searchTimer);
    state.searchTimer = setTimeout(() => refreshGallery(), SEARCH_DELAY_MS);
  });
  await refreshGallery();
}
