// The endpoint picker's groups and friendly names, and the banner shown while demo weights stand in for the
// real ones. Both come from the server: GET /api/endpoints (title, model, task, schema) and GET /api/info.

import { getJSON, h } from "./lib.js";

const GROUPS = [["text-to-image", "Text to image"], ["edit", "Edit"], ["lora", "LoRA"], ["klein", "klein"]];

// Which group of the picker an endpoint goes in: LoRA and klein endpoints by their input schema, the rest by task.
export function groupOf(endpoint) {
  if (endpoint.schema === "lora") return "lora";
  if (endpoint.schema === "klein") return "klein";
  return endpoint.task === "edit" ? "edit" : "text-to-image";
}

// "FLUX.2 [dev] Turbo edit" -> "FLUX.2 [dev] · Turbo" in the Edit group, "… · Turbo · Edit" in a mixed group; a
// parenthesised note in the title ("served by [dev] weights, …") goes to the secondary text (endpointNote).
export function friendlyName(endpoint) {
  const group = groupOf(endpoint);
  let name = (endpoint.title || endpoint.endpoint_id).replace(/\s*\([^)]*\)\s*$/, "");
  name = name.replace(/\s+(edit\s+)?with LoRAs$/i, "").replace(/\s+edit$/i, "");
  name = name.replace(/^(FLUX\.2 \[[^\]]+\])\s+([A-Z][a-z]+)$/, "$1 · $2");
  if (endpoint.task === "edit" && group !== "edit") name += " · Edit";
  return name;
}

export function endpointNote(endpoint) {
  return /\(([^)]*)\)\s*$/.exec(endpoint.title || "")?.[1] || "";
}

// The picker's <optgroup>s: Text to image, Edit, LoRA, klein (empty groups left out), each option named for people
// with its endpoint id as tooltip (the id is also shown under the picker).
export function endpointGroups(endpoints) {
  return GROUPS.map(([key, label]) => {
    const members = endpoints.filter((e) => groupOf(e) === key);
    if (!members.length) return null;
    return h("optgroup", { label, "data-group": key },
      members.map((e) => h("option", { value: e.endpoint_id, title: e.endpoint_id }, friendlyName(e))));
  }).filter(Boolean);
}

// A banner under the top bar when the server runs the tiny demo models; nothing otherwise (or if it cannot tell).
export async function showDemoBanner() {
  let info;
  try { info = await getJSON("/api/info"); } catch { return; }
  if (!info?.demo) return;
  document.querySelector(".topbar").after(h("div", { id: "demo-banner", class: "demo-banner", role: "note" },
    h("strong", {}, "Demo weights: images are noise."),
    " Configure real weights to generate pictures: start the server without ", h("code", {}, "--demo"),
    " (docs/models.md)."));
}
