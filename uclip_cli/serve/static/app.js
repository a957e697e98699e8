// uclip serve: the page. Plain JavaScript, no build step, no third-party code, nothing from the network
// but this server's own /api, /thumb and /image answers.
"use strict";

const PAGE = 50;            // results per request
const THUMB_RETRIES = 3;    // a 503 (thumbnails busy) is retried after a pause
const $ = (id) => document.getElementById(id);

const state = {
  mode: null,               // "search" | "similar" | "upload"
  q: "",
  similar: null,            // the result whose look-alikes are shown
  upload: null,             // the File whose look-alikes are shown (posted again for each page, kept nowhere else)
  results: [],
  more: false,
  loading: false,
  generation: 0,            // bumped by every new query: answers to older ones are dropped
  current: -1,              // index of the photo open in the viewer
};

async function api(url, file) {
  const options = { headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (file) {
    Object.assign(options, { method: "POST", body: file });
    options.headers["Content-Type"] = /^image\//.test(file.type) ? file.type : "application/octet-stream";
  }
  const response = await fetch(url, options);
  let body;
  try { body = await response.json(); } catch { body = { error: `${response.status} ${response.statusText}` }; }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

// the photo filters: each control's id is its API parameter (after, before, camera, near, within, gps, shape,
// tag, sort); the URL keeps them, so a filtered search can be reloaded, bookmarked and shared
const FILTERS = ["after", "before", "camera", "near", "within", "gps", "shape", "tag", "sort"];

function filterParams(p) {
  for (const id of FILTERS) {
    const control = $(id);
    const value = control.type === "checkbox" ? (control.checked ? "1" : "") : control.value.trim();
    if (value) p.set(id, value);
  }
  return p;
}

function anyFilter() {
  return [...filterParams(new URLSearchParams()).keys()].some((k) => k !== "sort");
}

function keepInUrl(base) {
  const p = filterParams(new URLSearchParams(base));
  history.replaceState(null, "", `?${p}`);
}

function pageParams(offset) {
  const p = new URLSearchParams({ top: String(PAGE), offset: String(offset) });
  const folder = $("folder").value.trim();
  if (folder) p.set("in", folder);
  const min = $("min-score").value.trim();
  if (min) p.set("min_score", min);
  return filterParams(p);
}

function show(element, text, isError = false) {
  element.textContent = text || "";
  element.hidden = !text;
  element.classList.toggle("error", isError);
}

function showNotes(notes) {
  show($("notes"), (notes || []).join(" · "));
}

async function load(reset) {
  if (!state.mode || (state.loading && !reset)) return;
  const generation = reset ? ++state.generation : state.generation;
  if (reset) { state.results = []; state.more = false; }
  if (reset && window.closeDupes) window.closeDupes();    // dupes.js: a search leaves the Duplicates view
  state.loading = true;
  $("grid").setAttribute("aria-busy", "true");
  const p = pageParams(state.results.length);
  let url;
  if (state.mode === "search") { p.set("q", state.q); url = `/api/search?${p}`; }
  else if (state.mode === "upload") { url = `/api/similar-upload?${p}`; }
  else { url = `/api/similar/${encodeURIComponent(state.similar.id)}?${p}`; }
  try {
    const body = await api(url, state.mode === "upload" ? state.upload : null);
    if (generation !== state.generation) return;
    if (reset) $("grid").replaceChildren();
    showNotes(body.notes);
    const first = state.results.length;
    state.results.push(...body.results);
    state.more = body.more;
    body.results.forEach((r, i) => $("grid").append(card(r, first + i)));
    if (reset) describe(body);
    $("more").hidden = !state.more;
  } catch (error) {
    if (generation !== state.generation) return;
    if (reset) $("grid").replaceChildren();
    $("more").hidden = true;
    show($("heading"), "");
    show($("message"), error.message, true);
  } finally {
    if (generation === state.generation) {
      state.loading = false;
      $("grid").setAttribute("aria-busy", "false");
    }
  }
  if (generation === state.generation && state.more && moreIsVisible()) load(false);
}

function describe(body) {
  if (state.mode === "similar") {
    show($("heading"), `Photos like ${state.similar.name}`);
  } else if (state.mode === "upload") {
    show($("heading"), `Photos like your photo ${state.upload.name || ""}` +
      (body.query && body.query.indexed ? " (it is in the index too)" : " (not indexed, not saved)"));
  } else if (body.query && body.query.kind === "combined") {
    show($("heading"), `Searching: ${body.query.read_as}`);
  } else {
    show($("heading"), "");
  }
  if (body.results.length) { show($("message"), ""); return; }
  const min = $("min-score").value.trim();
  const folder = $("folder").value.trim();
  let text = state.mode !== "search" ? "No other photos to compare with"
    : state.q ? `Nothing matched “${state.q}”` : "No photo";
  if (min) text += ` with a score of at least ${min}`;
  if (folder) text += ` in ${folder}`;
  if (anyFilter()) text += " among the photos that pass the filters";
  show($("message"), text + ".");
}

function card(result, index) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "card";
  button.dataset.index = String(index);
  button.title = result.path;
  const img = document.createElement("img");
  img.alt = result.name;
  img.loading = "lazy";
  img.decoding = "async";
  let tries = 0;
  img.addEventListener("error", () => {
    if (tries++ < THUMB_RETRIES) setTimeout(() => { img.src = `${result.thumb}?try=${tries}`; }, 400 * tries);
  });
  img.src = result.thumb;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = result.score === null ? (result.taken || "").slice(0, 10) : result.score.toFixed(3);
  const name = document.createElement("span");
  name.className = "name";
  name.dir = "auto";
  name.textContent = result.name;
  button.append(img, score, name);
  button.addEventListener("click", () => openViewer(index));
  item.append(button);
  return item;
}

// ------------------------------------------------------------------------------------ the viewer

function openViewer(index) {
  const result = state.results[index];
  if (!result) return;
  state.current = index;
  $("large").src = result.image;
  $("large").alt = result.name;
  $("large-path").textContent = result.path;
  $("large-score").textContent = result.score === null ? "" : `score ${result.score.toFixed(3)}`;
  $("large-meta").textContent = [result.taken && result.taken.replace("T", " "), result.camera].filter(Boolean).join(" · ");
  const copies = result.paths.length - 1;
  $("large-copies").textContent = copies > 0 ? `also at: ${result.paths.slice(1).join(", ")}` : "";
  $("prev").disabled = index === 0;
  $("next").disabled = index === state.results.length - 1 && !state.more;
  $("viewer").hidden = false;
  $("similar").focus();
}

function closeViewer() {
  if ($("viewer").hidden) return;
  $("viewer").hidden = true;
  $("large").removeAttribute("src");
  const button = document.querySelector(`.card[data-index="${state.current}"]`);
  if (button) button.focus();
}

async function step(delta) {
  const target = state.current + delta;
  if (target >= state.results.length && state.more) await load(false);
  if (target >= 0 && target < state.results.length) openViewer(target);
}

function moreLikeThis() {
  const result = state.results[state.current];
  if (!result) return;
  closeViewer();
  state.mode = "similar";
  state.similar = result;
  keepInUrl({ similar: result.id });
  load(true);
  window.scrollTo(0, 0);
}

// ------------------------------------------------------------------------------------ search by a photo of one's own

function searchByPhoto(file) {
  if (!file) return;
  closeViewer();
  state.mode = "upload";
  state.upload = file;
  keepInUrl({});             // the photo cannot live in the URL; the filters do
  show($("message"), "");
  load(true);
  window.scrollTo(0, 0);
}

$("upload-button").addEventListener("click", () => $("upload").click());
$("upload").addEventListener("change", () => {
  searchByPhoto($("upload").files[0]);
  $("upload").value = "";   // picking the same file again searches again
});

let dragDepth = 0;
const carriesFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
document.addEventListener("dragenter", (event) => {
  if (!carriesFiles(event)) return;
  dragDepth++;
  $("drop").hidden = false;
});
document.addEventListener("dragleave", (event) => {
  if (carriesFiles(event) && --dragDepth <= 0) { dragDepth = 0; $("drop").hidden = true; }
});
document.addEventListener("dragover", (event) => {
  if (carriesFiles(event)) { event.preventDefault(); event.dataTransfer.dropEffect = "copy"; }
});
document.addEventListener("drop", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();      // never let the browser open the file in place of the page
  dragDepth = 0;
  $("drop").hidden = true;
  searchByPhoto(event.dataTransfer.files[0]);
});

// ------------------------------------------------------------------------------------ keys and scrolling

function columns() {
  return getComputedStyle($("grid")).gridTemplateColumns.split(" ").filter(Boolean).length || 1;
}

function moveFocus(event) {
  const index = Number(document.activeElement.dataset.index);
  const delta = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -columns(), ArrowDown: columns() }[event.key];
  const rtl = getComputedStyle($("grid")).direction === "rtl";
  const target = index + (rtl && Math.abs(delta) === 1 ? -delta : delta);
  const button = document.querySelector(`.card[data-index="${target}"]`);
  if (button) { event.preventDefault(); button.focus(); button.scrollIntoView({ block: "nearest" }); }
}

document.addEventListener("keydown", (event) => {
  if (!$("viewer").hidden) {
    if (event.key === "Escape") { event.preventDefault(); closeViewer(); }
    else if (event.key === "ArrowLeft") { event.preventDefault(); step(-1); }
    else if (event.key === "ArrowRight") { event.preventDefault(); step(1); }
    return;
  }
  const typing = /^(INPUT|TEXTAREA|SELECT)$/.test(document.activeElement.tagName);
  if (event.key === "/" && !typing) { event.preventDefault(); $("q").focus(); $("q").select(); return; }
  if (event.key === "Escape" && typing) { document.activeElement.blur(); return; }
  if (event.key.startsWith("Arrow") && document.activeElement.classList.contains("card")) moveFocus(event);
});

function moreIsVisible() {
  const rect = $("more").getBoundingClientRect();
  return !$("more").hidden && rect.top < window.innerHeight + 400;
}

new IntersectionObserver((entries) => {
  if (entries.some((e) => e.isIntersecting) && state.more && !state.loading) load(false);
}, { rootMargin: "400px" }).observe($("more"));

// ------------------------------------------------------------------------------------ start

function search(q) {
  state.mode = "search";
  state.q = q;
  keepInUrl(q ? { q } : {});
  load(true);
}

$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = $("q").value.trim();
  if (q || anyFilter()) search(q);      // filters alone list the photos that pass, newest first
});
for (const id of ["folder", "min-score", ...FILTERS]) {
  $(id).addEventListener("change", () => {
    if (state.mode === "search") search(state.q);
    else if (state.mode === "upload") { keepInUrl({}); load(true); }
    else if (state.mode) { keepInUrl({ similar: state.similar.id }); load(true); }
  });
}
$("more").addEventListener("click", () => load(false));
$("close").addEventListener("click", closeViewer);
$("prev").addEventListener("click", () => step(-1));
$("next").addEventListener("click", () => step(1));
$("similar").addEventListener("click", moreLikeThis);
$("viewer").addEventListener("click", (event) => { if (event.target === $("viewer")) closeViewer(); });

async function start() {
  try {
    const status = await api("/api/status");
    const photos = status.index.photos;
    $("about").textContent = `${photos} photo${photos === 1 ? "" : "s"} · ` +
      (status.bundle.heads_trained ? "any language" : "English only (heads not trained)");
    showNotes(status.notes);
    $("roots").replaceChildren(...status.index.roots.map((root) => Object.assign(document.createElement("option"), { value: root })));
  } catch (error) {
    show($("message"), error.message, true);
  }
  const params = new URLSearchParams(location.search);
  await fillTags(params.get("tag"));
  for (const id of FILTERS) {
    const value = params.get(id);
    if (value === null) continue;
    if ($(id).type === "checkbox") $(id).checked = value === "1";
    else $(id).value = value;
  }
  if (params.get("q") || (!params.get("similar") && anyFilter())) {
    $("q").value = params.get("q") || "";
    search(params.get("q") || "");
  }
  else if (params.get("similar")) {
    state.mode = "similar";
    state.similar = { id: params.get("similar"), name: "this photo" };
    load(true);
  }
}

// the tag filter: the labels of `uclip tag` (GET /api/tags), shown once there are any; a tag the URL names is
// kept even when the index no longer has it (the search then says so)
async function fillTags(wanted) {
  let labels = [];
  try { labels = (await api("/api/tags")).labels.filter((x) => !x.stale); } catch { /* no tags: no control */ }
  const names = labels.map((x) => x.label);
  if (wanted && !names.includes(wanted)) names.push(wanted);
  $("tag").append(...names.map((name) => {
    const count = labels.find((x) => x.label === name)?.photos;
    return Object.assign(document.createElement("option"), { value: name, textContent: count === undefined ? name : `${name} (${count})` });
  }));
  $("tag").hidden = names.length === 0;
}

start();
