// uclip serve: the "Duplicates" view. Groups of near-duplicate photos from /api/dupes, largest group first,
// each photo with its thumbnail, name, folder, pixel size, file size and capture time, so that a user can pick
// which to keep; it never deletes, moves or changes anything (the server has no way to).
//
// It lives beside app.js and uses its helpers ($, api, show, showNotes, state). Its state is in the URL as
// ?dupes=THRESHOLD (and &in=FOLDER), the way app.js keeps ?q= and the filters: a reload, a bookmark or a
// shared link opens the same view. app.js calls closeDupes() when a search, "more like this" or a photo
// search starts; the view closes itself otherwise. Its names stay inside one function (window.closeDupes
// aside), so they never meet app.js's.
(() => {
"use strict";

const DUPES_DEFAULT = "0.95";
const DUPES_TOP = 200;      // groups asked for (the API's most); more: the summary says so
const dupes = { open: false, generation: 0 };

function openDupes(threshold) {
  dupes.open = true;
  state.mode = null;                 // app.js: answers to a search still on its way are dropped
  state.generation++;
  $("viewer").hidden = true;
  $("grid").replaceChildren();
  $("more").hidden = true;
  show($("heading"), "");
  show($("message"), "");
  $("dupes").hidden = false;
  $("dupes-threshold").value = threshold || DUPES_DEFAULT;
  loadDupes();
}

function closeDupes() {
  if (!dupes.open) return;
  dupes.open = false;
  dupes.generation++;
  $("dupes").hidden = true;
  $("dupes-list").replaceChildren();
}

function dupesParams() {
  const p = new URLSearchParams({ dupes: $("dupes-threshold").value.trim() || DUPES_DEFAULT });
  const folder = $("folder").value.trim();
  if (folder) p.set("in", folder);
  return p;
}

async function loadDupes() {
  const generation = ++dupes.generation;
  const p = dupesParams();
  history.replaceState(null, "", `?${p}`);
  const asked = new URLSearchParams({ threshold: p.get("dupes"), top: String(DUPES_TOP) });
  if (p.get("in")) asked.set("in", p.get("in"));
  $("dupes-list").replaceChildren();
  $("dupes-list").setAttribute("aria-busy", "true");
  show($("dupes-summary"), "Looking for near-duplicates…");
  try {
    const body = await api(`/api/dupes?${asked}`);
    if (generation !== dupes.generation) return;
    showNotes(body.notes);
    $("dupes-list").replaceChildren(...body.groups.map(dupeGroup));
    const n = body.groups.length;
    let text = n ? `${n}${body.more ? "+" : ""} group${n === 1 ? "" : "s"} of near-duplicates among ${body.photos} photos`
      : `No near-duplicates among ${body.photos} photos`;
    text += ` at cosine ≥ ${body.threshold}` + (p.get("in") ? ` in ${p.get("in")}` : "");
    if (n) text += ", largest group first, the largest photo first in each. Nothing is deleted: pick what to keep.";
    if (body.more) text += ` Only the first ${n} groups are shown: raise the threshold or pick a folder.`;
    show($("dupes-summary"), text + (n ? "" : "."));
  } catch (error) {
    if (generation !== dupes.generation) return;
    show($("dupes-summary"), error.message, true);
  } finally {
    if (generation === dupes.generation) $("dupes-list").setAttribute("aria-busy", "false");
  }
}

function dupeGroup(group, index) {
  const section = document.createElement("section");
  section.className = "dupe-group";
  const title = document.createElement("h2");
  title.className = "dupe-size";
  title.textContent = `Group ${index + 1}: ${group.files} files` +
    (group.photos !== group.files ? ` (${group.photos} different, the rest exact copies)` : "");
  const list = document.createElement("ol");
  list.className = "dupe-members";
  list.append(...group.members.map((member, k) => dupeMember(member, k)));
  section.append(title, list);
  return section;
}

function dupeMember(member, k) {
  const item = document.createElement("li");
  const link = Object.assign(document.createElement("a"), { href: member.image || "#", target: "_blank", rel: "noopener" });
  const img = Object.assign(document.createElement("img"), { alt: baseName(member.path), loading: "lazy", decoding: "async" });
  let tries = 0;
  img.addEventListener("error", () => {
    if (tries++ < THUMB_RETRIES) setTimeout(() => { img.src = `${member.thumb}?try=${tries}`; }, 400 * tries);
  });
  if (member.thumb) img.src = member.thumb;
  link.append(img);
  const caption = document.createElement("div");
  caption.className = "dupe-caption";
  const name = Object.assign(document.createElement("strong"), { dir: "auto", textContent: baseName(member.path) });
  const facts = document.createElement("span");
  facts.className = "dupe-facts";
  facts.textContent = [
    k === 0 ? "largest" : `cosine ${member.similarity.toFixed(3)}`,
    member.width && member.height ? `${member.width}×${member.height}` : null,
    fileSize(member.size),
    member.taken ? member.taken.replace("T", " ") + (member.taken_source === "mtime" ? " (file time)" : "") : null,
  ].filter(Boolean).join(" · ");
  const where = Object.assign(document.createElement("span"), { className: "dupe-path", dir: "auto" });
  where.textContent = member.paths.join("\n");
  caption.append(name, facts, where);
  item.append(link, caption);
  return item;
}

function baseName(path) {
  return (path || "").split("/").pop();
}

function fileSize(bytes) {
  if (bytes === null || bytes === undefined) return null;
  const units = ["B", "KB", "MB", "GB"];
  let value = bytes, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit++; }
  return unit ? `${value.toFixed(1)} ${units[unit]}` : `${value} B`;
}

$("dupes-button").addEventListener("click", () => openDupes(new URLSearchParams(location.search).get("dupes")));
$("dupes-threshold").addEventListener("change", () => { if (dupes.open) loadDupes(); });
$("folder").addEventListener("change", () => { if (dupes.open) loadDupes(); });
$("dupes-close").addEventListener("click", () => {
  closeDupes();
  history.replaceState(null, "", "?");
  $("q").focus();
});

window.closeDupes = closeDupes;      // app.js closes the view when a search starts

const opened = new URLSearchParams(location.search);
if (opened.has("dupes")) {
  if (opened.get("in")) $("folder").value = opened.get("in");
  openDupes(opened.get("dupes"));
}
})();
