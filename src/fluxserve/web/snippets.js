// "Copy as code": the playground's current request as code for five clients, each runnable as shown against
// this server. Pure functions, no DOM: snippets(endpointId, input, server, info) -> one entry per client.
// `input` is the fal input the form would submit; `info` is the endpoint's /api/endpoints entry (its
// `openai_model` and `replicate_model`, null when no model of that dialect reaches it) plus `defaults`, the
// input schema's defaults (a field left at its default is not reported as dropped). setupCodeDialog builds the
// page's dialog around them.

import { h } from "./lib.js";

export const CLIENTS = [
  { id: "python", label: "Python", title: "fal_client" },
  { id: "js", label: "JavaScript", title: "@fal-ai/client" },
  { id: "curl", label: "cURL", title: "fal sync API" },
  { id: "openai", label: "OpenAI", title: "openai SDK" },
  { id: "replicate", label: "Replicate", title: "replicate client" },
];

const KEY_NOTE = "any text on loopback until a key exists";
const FAL_SIZES = {
  square_hd: [1024, 1024], square: [512, 512], portrait_4_3: [768, 1024], portrait_16_9: [576, 1024],
  landscape_4_3: [1024, 768], landscape_16_9: [1024, 576],
};

// ---- literals -----------------------------------------------------------------------------------------------
// A value as a Python or JavaScript literal, one entry per line, indented by `pad`.
function literal(value, lang, pad = "") {
  if (value === null || value === undefined) return lang === "py" ? "None" : "null";
  if (typeof value === "boolean") return lang === "py" ? (value ? "True" : "False") : String(value);
  if (typeof value !== "object") return JSON.stringify(value);
  const inner = `${pad}${lang === "py" ? "    " : "  "}`;
  const entries = Array.isArray(value)
    ? value.map((v) => literal(v, lang, inner))
    : Object.entries(value).map(([k, v]) =>
      `${lang === "js" && /^[A-Za-z_$][\w$]*$/.test(k) ? k : JSON.stringify(k)}: ${literal(v, lang, inner)}`);
  const [open, close] = Array.isArray(value) ? ["[", "]"] : ["{", "}"];
  if (!entries.length) return open + close;
  const flat = Object.values(value).every((v) => v === null || typeof v !== "object");
  const line = `${open}${entries.join(", ")}${close}`;
  if (flat && line.length <= 60) return line;  // {"width": 512, "height": 512} on one line
  return `${open}\n${entries.map((e) => `${inner}${e},`).join("\n")}\n${pad}${close}`;
}

const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

function sizeOf(imageSize) {
  if (imageSize && typeof imageSize === "object") return [imageSize.width, imageSize.height];
  return FAL_SIZES[imageSize] || null;  // null: "auto", the first reference's size
}

// The fields of `input` no mapping took, that differ from the schema's defaults.
function dropped(input, used, defaults) {
  return Object.keys(input).filter((k) => !used.has(k) && !same(input[k], defaults?.[k]))
    .map((k) => `${k}=${JSON.stringify(input[k])}`);
}

function droppedComment(names, dialect) {
  return names.length ? `# Not sent (no ${dialect} equivalent): ${names.join(", ")}\n` : "";
}

// ---- fal: Python, JavaScript, cURL ----------------------------------------------------------------------------
function falPython(endpointId, input, server) {
  return `# fal_client against fluxserve (pip install fal-client)
# Key: set FAL_KEY to your fluxserve key (${KEY_NOTE})
import os

import fal_client

server = ${JSON.stringify(server)}
fal_client.client.RUN_URL_FORMAT = f"{server}/run/"
fal_client.client.QUEUE_URL_FORMAT = f"{server}/queue/"
fal_client.client.REST_URL = fal_client.client.CDN_URL = server  # uploads go to the server too
os.environ["FAL_KEY"] = os.environ.get("FAL_KEY") or "local"

result = fal_client.subscribe(
    ${JSON.stringify(endpointId)},
    arguments=${literal(input, "py", "    ")},
)
for image in result["images"]:
    print(image["url"])
`;
}

function falJs(endpointId, input, server) {
  return `// @fal-ai/client against fluxserve (npm install @fal-ai/client; Node 18+, save as snippet.mjs)
// Key: set FAL_KEY to your fluxserve key (${KEY_NOTE})
import { createFalClient } from "@fal-ai/client";

const server = ${JSON.stringify(server)};
const hosts = [  // fal's hosts, served here
  ["https://queue.fal.run/", \`\${server}/queue/\`],
  ["https://fal.run/", \`\${server}/run/\`],
  ["https://rest.fal.ai/", \`\${server}/\`],
  ["https://v3.fal.media/", \`\${server}/\`],
];
const fal = createFalClient({
  credentials: process.env.FAL_KEY || "local",
  fetch: (url, init) => {
    const text = String(url);
    const host = hosts.find(([from]) => text.startsWith(from));
    return fetch(host ? host[1] + text.slice(host[0].length) : text, init);
  },
});

const result = await fal.subscribe(${JSON.stringify(endpointId)}, {
  input: ${literal(input, "js", "  ")},
});
for (const image of result.data.images) console.log(image.url);
`;
}

function falCurl(endpointId, input, server) {
  return `# fal's sync API: POST /run/<endpoint> answers with the output (POST /queue/<endpoint> to submit and poll)
# Key: set FAL_KEY to your fluxserve key (${KEY_NOTE})
curl -sS -w "\\n" -X POST ${JSON.stringify(`${server}/run/${endpointId}`)} \\
  -H "Authorization: Key \${FAL_KEY:-local}" \\
  -H "Content-Type: application/json" \\
  --data-binary @- <<'JSON'
${JSON.stringify(input, null, 2)}
JSON
`;
}

// ---- OpenAI ----------------------------------------------------------------------------------------------------
const OPENAI_EXTRA = ["seed", "num_inference_steps", "guidance_scale", "acceleration", "safety_tolerance",
  "enable_safety_checker", "enable_prompt_expansion"];

function openai(endpointId, input, server, info) {
  const model = info?.openai_model;
  if (!model) {
    return { unavailable: `No OpenAI model reaches ${endpointId}: the OpenAI Images API cannot call this ` +
      "endpoint. Use the Python, JavaScript or cURL tab (fal's API) instead." };
  }
  const used = new Set(["prompt", "image_size", "num_images", "output_format", "image_urls", ...OPENAI_EXTRA]);
  const edit = Array.isArray(input.image_urls) && input.image_urls.length > 0;
  const size = sizeOf(input.image_size);
  const args = { model, prompt: input.prompt ?? "" };
  if (edit) args.image = null;  // placed below as code
  args.size = size ? `${size[0]}x${size[1]}` : "auto";
  if (input.num_images !== undefined && input.num_images !== 1) args.n = input.num_images;
  if (input.output_format !== undefined) args.output_format = input.output_format;
  const extra = {};
  for (const name of OPENAI_EXTRA) {
    if (input[name] === undefined) continue;
    extra[name] = name === "safety_tolerance" ? Number(input[name]) : input[name];
  }
  if (Object.keys(extra).length) args.extra_body = extra;  // fields the SDK has no parameter for
  const drop = dropped(input, used, info.defaults);
  const lines = Object.entries(args).map(([k, v]) =>
    `    ${k}=${k === "image" ? "[(f\"reference-{i + 1}\", urlopen(ref).read()) for i, ref in enumerate(references)]"
      : literal(v, "py", "    ")},`);
  const refs = edit ? `references = ${literal(input.image_urls, "py")}  # URLs or data URIs, sent as files\n` : "";
  const code = `# OpenAI SDK against fluxserve (pip install openai)
# Key: set OPENAI_API_KEY to your fluxserve key (${KEY_NOTE})
${droppedComment(drop, "OpenAI")}import os
${edit ? "from urllib.request import urlopen\n" : ""}
from openai import OpenAI

client = OpenAI(
    base_url=${JSON.stringify(`${server}/v1`)},
    api_key=os.environ.get("OPENAI_API_KEY") or "local",
)
${refs}result = client.images.${edit ? "edit" : "generate"}(
${lines.join("\n")}
)
for image in result.data:
    print(image.url)
`;
  return { code, dropped: drop };
}

// ---- Replicate ------------------------------------------------------------------------------------------------
const REPLICATE_FORMATS = { jpeg: "jpg", png: "png", webp: "webp" };
const REPLICATE_MAX_GUIDANCE = 10;

function replicate(endpointId, input, server, info) {
  const model = info?.replicate_model;
  if (!model) {
    return { unavailable: `No Replicate model reaches ${endpointId}: Replicate's predictions API cannot call ` +
      "this endpoint. Use the Python, JavaScript or cURL tab (fal's API) instead." };
  }
  const family = model.split("/").pop().replace(/^flux-2-/, "");
  const used = new Set(["prompt", "image_urls", "image_size", "seed", "num_inference_steps", "guidance_scale",
    "output_format", "safety_tolerance", "enable_safety_checker"]);
  const body = { prompt: input.prompt ?? "" };
  if (input.image_urls?.length) body.input_images = input.image_urls;
  const size = sizeOf(input.image_size);
  if (size) Object.assign(body, { aspect_ratio: "custom", width: size[0], height: size[1] });
  else Object.assign(body, { aspect_ratio: "match_input_image", resolution: "match_input_image" });
  if (input.seed !== undefined) body.seed = input.seed;
  if (input.num_inference_steps !== undefined) body.steps = input.num_inference_steps;
  if (input.guidance_scale !== undefined && input.guidance_scale <= REPLICATE_MAX_GUIDANCE) {
    body.guidance = input.guidance_scale;
  } else used.delete("guidance_scale");
  if (input.output_format !== undefined) body.output_format = REPLICATE_FORMATS[input.output_format];
  if (input.safety_tolerance !== undefined) body.safety_tolerance = Number(input.safety_tolerance);
  if (input.enable_safety_checker !== undefined) body.disable_safety_checker = !input.enable_safety_checker;
  if (family === "dev" && input.acceleration !== undefined) {
    body.go_fast = input.acceleration === "high";
    used.add("acceleration");
  }
  if (family === "flex" && input.enable_prompt_expansion !== undefined) {
    body.prompt_upsampling = input.enable_prompt_expansion;
    used.add("enable_prompt_expansion");
  }
  if (input.num_images === 1) used.add("num_images");  // a prediction makes one image
  const drop = dropped(input, used, { ...info.defaults, num_images: 1 })
    .map((d) => (d.startsWith("guidance_scale=") ? `${d} (Replicate takes 0-${REPLICATE_MAX_GUIDANCE})` : d));
  const code = `# Replicate client against fluxserve (pip install replicate)
# Key: set REPLICATE_API_TOKEN to your fluxserve key (${KEY_NOTE})
${droppedComment(drop, "Replicate")}import os

import replicate

client = replicate.Client(
    api_token=os.environ.get("REPLICATE_API_TOKEN") or "local",
    base_url=${JSON.stringify(server)},
)
output = client.run(
    ${JSON.stringify(model)},
    input=${literal(body, "py", "    ")},
)
print(output)
`;
  return { code, dropped: drop };
}

// ---- all of them --------------------------------------------------------------------------------------------------
const BUILDERS = {
  python: (...a) => ({ code: falPython(...a) }),
  js: (...a) => ({ code: falJs(...a) }),
  curl: (...a) => ({ code: falCurl(...a) }),
  openai,
  replicate,
};

// [{id, label, title, code, dropped, unavailable}]: `code` runs as shown; `unavailable` says why there is none.
export function snippets(endpointId, input, server, info) {
  return CLIENTS.map((client) => ({ ...client, dropped: [], ...BUILDERS[client.id](endpointId, input, server, info) }));
}

// The code for display: data URIs longer than `max` shortened (copy the code itself, not this).
export function elide(code, max = 96) {
  return code.replace(/data:[\w.+-]+\/[\w.+-]+(;[\w=-]+)*,[A-Za-z0-9+/=%_-]+/g, (uri) =>
    (uri.length > max ? `${uri.slice(0, 48)}…(${uri.length} characters)` : uri));
}

// ---- the dialog ---------------------------------------------------------------------------------------------------
// The page's "Copy as code" dialog. `current()` -> {endpointId, input, info} of the form as it is now, or null
// when the form cannot be read (it shows why itself).
export function setupCodeDialog(opener, current) {
  const tabs = h("div", { role: "tablist", class: "code-tabs", "aria-label": "Client" });
  const panels = h("div", { class: "code-panels" });
  const title = h("h2", { id: "code-title" }, "Copy as code");
  const summary = h("p", { class: "hint code-summary" });
  const close = h("button", { type: "button", class: "secondary small", "aria-label": "Close" }, "Close");
  const dialog = h("dialog", { id: "code-dialog", class: "code-dialog", "aria-labelledby": "code-title" },
    h("div", { class: "code-head" }, title, close), summary, tabs, panels);
  document.body.append(dialog);
  close.addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", () => opener.focus());
  dialog.addEventListener("click", (event) => { if (event.target === dialog) dialog.close(); });  // the backdrop

  const select = (id, focus = false) => {
    for (const tab of tabs.children) {
      const on = tab.dataset.client === id;
      tab.setAttribute("aria-selected", String(on));
      tab.tabIndex = on ? 0 : -1;
      if (on && focus) tab.focus();
    }
    for (const panel of panels.children) panel.hidden = panel.dataset.client !== id;
  };
  tabs.addEventListener("keydown", (event) => {
    const all = [...tabs.children];
    const at = all.indexOf(document.activeElement);
    const to = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: all.length - 1 }[event.key];
    if (at < 0 || to === undefined) return;
    event.preventDefault();
    select(all[(to + all.length) % all.length].dataset.client, true);
  });

  const render = ({ endpointId, input, info }) => {
    const chosen = tabs.querySelector("[aria-selected='true']")?.dataset.client || CLIENTS[0].id;
    summary.textContent = `${endpointId} on ${location.origin}: the form as it is now. Each snippet runs as shown.`;
    tabs.replaceChildren();
    panels.replaceChildren();
    for (const s of snippets(endpointId, input, location.origin, info)) {
      tabs.append(h("button", { type: "button", role: "tab", id: `code-tab-${s.id}`, "data-client": s.id,
        "aria-controls": `code-panel-${s.id}`, onclick: () => select(s.id) },
      s.label, h("span", { class: "code-tab-title" }, s.title)));
      panels.append(codePanel(s));
    }
    select(chosen);
  };

  opener.addEventListener("click", () => {
    const form = current();
    if (!form) return;
    render(form);
    dialog.showModal();
    tabs.querySelector("[aria-selected='true']").focus();
  });
}

function codePanel(s) {
  const panel = h("div", { role: "tabpanel", id: `code-panel-${s.id}`, class: "code-panel", "data-client": s.id,
    "aria-labelledby": `code-tab-${s.id}`, tabindex: "0" });
  if (s.unavailable) {
    panel.append(h("p", { class: "code-unavailable" }, s.unavailable));
    return panel;
  }
  const copied = h("span", { class: "code-copied", role: "status" });
  const copy = h("button", { type: "button", class: "primary small code-copy" }, "Copy");
  copy.addEventListener("click", async () => {
    copied.textContent = await copyText(s.code) ? "Copied" : "Could not copy: select the text instead";
    clearTimeout(copy.timer);
    copy.timer = setTimeout(() => { copied.textContent = ""; }, 2500);
  });
  if (s.dropped.length) {
    panel.append(h("p", { class: "code-dropped" }, `Not sent (no ${s.label} equivalent): ${s.dropped.join(", ")}`));
  }
  panel.append(
    h("div", { class: "code-actions" }, copy, copied),
    h("pre", { class: "mono code-text", "data-elided": String(elide(s.code) !== s.code) }, elide(s.code)),
  );
  return panel;
}

// The clipboard API where the page is a secure context (https, loopback); a selected textarea elsewhere.
async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.querySelector("dialog[open]")?.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}
