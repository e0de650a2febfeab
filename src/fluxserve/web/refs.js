// The edit endpoints' reference images: a drop zone and a file picker (files go as data URIs), URLs in a text
// box, and thumbnails with each picked image's size and megapixels, their total against the endpoint's limit.

import { h } from "./lib.js";

export const MEGAPIXEL = 1024 * 1024;  // as the server counts them (inputs.MEGAPIXEL)
const DEFAULT_LIMIT_MP = 14;

const mp = (pixels) => (pixels / MEGAPIXEL).toFixed(2);

function readFile(file) {
  return new Promise((ok, fail) => {
    const reader = new FileReader();
    reader.onload = () => ok(reader.result);
    reader.onerror = () => fail(reader.error);
    reader.readAsDataURL(file);
  });
}

function imageSize(uri) {
  return new Promise((ok) => {
    const img = new Image();
    img.onload = () => ok({ width: img.naturalWidth, height: img.naturalHeight });
    img.onerror = () => ok(null);  // not an image the browser can read: the server says what is wrong
    img.src = uri;
  });
}

// The field as the form builder wants it: {kind, el, get, set, problem}; ``wrap`` adds the label, hint and error
// line; ``limits`` holds the endpoint's max_input_megapixels and max_references (from /api/endpoints).
export function referencesField(name, prop, required, wrap, limits = {}) {
  const limitMp = limits.max_input_megapixels || DEFAULT_LIMIT_MP;
  const files = [];  // {uri, width, height}
  const picker = h("input", { type: "file", id: `in-${name}`, accept: "image/*", multiple: true,
    class: "visually-hidden" });
  const zone = h("div", { class: "dropzone", id: `drop-${name}` },
    h("span", { class: "dropzone-icon", "aria-hidden": "true" }, "⇪"),
    h("span", {}, "Drop images here or ", h("label", { for: picker.id, class: "link-button" }, "choose files")),
    picker);
  const urls = h("textarea", { id: `in-${name}-urls`, rows: 2, class: "mono",
    placeholder: "or image URLs / data URIs, one per line", "aria-label": "Reference image URLs" });
  const thumbs = h("div", { class: "thumbs" });
  const total = h("p", { class: "hint mp-total", id: `mp-${name}`, "aria-live": "polite" });
  const changed = () => zone.dispatchEvent(new Event("change", { bubbles: true }));  // clears the field's error

  const totalPixels = () => files.reduce((sum, f) => sum + (f.width && f.height ? f.width * f.height : 0), 0);
  const redraw = () => {
    thumbs.replaceChildren(...files.map((file, i) => h("figure", { class: "thumb" },
      h("img", { src: file.uri, alt: `Reference ${i + 1}` }),
      h("figcaption", {}, file.width ? `${file.width}×${file.height}` : "?",
        h("br"), file.width ? `${mp(file.width * file.height)} MP` : ""),
      h("button", { type: "button", class: "remove", "aria-label": `Remove reference ${i + 1}`,
        onclick: () => { files.splice(i, 1); redraw(); changed(); } }, "×"))));
    const pixels = totalPixels();
    total.hidden = !files.length;
    total.textContent = `${mp(pixels)} MP of ${limitMp} MP` + (pixels > limitMp * MEGAPIXEL ? " · over the limit" : "");
    total.classList.toggle("over", pixels > limitMp * MEGAPIXEL);
  };
  const add = async (list) => {
    for (const file of list) {
      if (file.type && !file.type.startsWith("image/")) continue;
      const uri = await readFile(file);
      files.push({ uri, ...(await imageSize(uri)) });
    }
    redraw();
    changed();
  };

  picker.addEventListener("change", async (event) => {
    event.stopPropagation();  // the zone reports the change once the files are read
    await add([...picker.files]);
    picker.value = "";
  });
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    add([...(event.dataTransfer?.files || [])]);
  });
  redraw();

  const el = wrap(name, prop, h("div", { class: "refs" }, zone, thumbs, total, urls), { required });
  return { kind: "refs", el,
    get: () => {
      const list = [...files.map((f) => f.uri), ...urls.value.split("\n").map((s) => s.trim()).filter(Boolean)];
      return list.length || required ? list : undefined;
    },
    set: (v) => {
      files.length = 0;
      const list = Array.isArray(v) ? v : [];
      urls.value = list.filter((u) => !u.startsWith("data:")).join("\n");
      Promise.all(list.filter((u) => u.startsWith("data:"))
        .map(async (uri) => ({ uri, ...(await imageSize(uri)) }))).then((loaded) => { files.push(...loaded); redraw(); });
    },
    // What to say before submitting, when the picked images are over the endpoint's megapixel limit.
    problem: () => {
      const pixels = totalPixels();
      return pixels > limitMp * MEGAPIXEL
        ? `The reference images total ${mp(pixels)} MP; this endpoint accepts at most ${limitMp} MP. Remove some or use smaller images.`
        : "";
    } };
}
