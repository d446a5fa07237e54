// The finegrain search page: pick or drop an image, see its nearest indexed images.
// Plain DOM code, no library and nothing from elsewhere, so the page works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "finegrain-token";
const state = { file: null, info: null, token: sessionStorage.getItem(TOKEN_KEY) || "", urls: [] };

function authHeaders() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

// A call to the API: JSON back, or an Error carrying the server's message.
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (response.status === 401) {
    $("token-form").hidden = false;
    $("token").focus();
  }
  if (!response.ok) {
    throw new Error(body && body.message ? body.message : "The server answered " + response.status + ".");
  }
  return body;
}

async function loadInfo() {
  try {
    const info = await api("/v1/info");
    state.info = info;
    const index = info.index;
    const parts = [
      index.size + " images",
      (index.type + " " + index.parameters).trim(),
      "recall@" + index.recall_k + " " + index.recall.toFixed(3) + " at build",
      "model " + info.model.arch,
    ];
    if (info.classifier) parts.push("classifier: " + info.classifier.classes + " classes");
    $("facts").textContent = parts.join(" · ");
    $("k").max = String(info.limits.max_k);
  } catch (error) {
    $("facts").textContent = "";
    setStatus(error.message, true);
  }
}

function forgetUrls() {
  state.urls.forEach((url) => URL.revokeObjectURL(url));
  state.urls = [];
}

function objectUrl(blob) {
  const url = URL.createObjectURL(blob);
  state.urls.push(url);
  return url;
}

// Thumbnails: a plain src without a token; with one, fetched with the header (an <img> cannot send it).
async function showThumbnail(img, path) {
  if (!state.token) {
    img.src = path;
    return;
  }
  try {
    const response = await fetch(path, { headers: authHeaders() });
    if (response.ok) img.src = objectUrl(await response.blob());
  } catch (_) {
    img.alt += " (thumbnail unavailable)";
  }
}

function renderQuery(answer) {
  const known = answer.query.label;
  const caption = $("query-caption");
  caption.textContent = known ? "Class: " + known : "Class unknown";
  if (answer.query.indexed_id !== null) caption.textContent += " (indexed image #" + answer.query.indexed_id + ")";
  $("query").hidden = false;
}

function renderNeighbours(answer) {
  const known = answer.query.label;
  const list = $("neighbours");
  list.replaceChildren();
  for (const neighbour of answer.neighbours) {
    const item = document.createElement("li");
    item.dataset.id = String(neighbour.id);
    item.dataset.rank = String(neighbour.rank);
    const same = known ? neighbour.label === known : null;
    item.className = same === null ? "neutral" : same ? "match" : "miss";
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = "Neighbour " + neighbour.rank + ": " + (neighbour.label || "no class");
    img.width = 256;
    img.height = 256;
    img.decoding = "async";
    const caption = document.createElement("figcaption");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = neighbour.label || "—";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = neighbour.score.toFixed(4);
    score.title = "cosine similarity";
    caption.append(label, score);
    if (same !== null) {
      const mark = document.createElement("span");
      mark.className = "mark";
      mark.textContent = same ? "✓" : "✗";
      mark.setAttribute("aria-label", same ? "same class as the query" : "another class");
      caption.append(mark);
    }
    figure.append(img, caption);
    item.append(figure);
    list.append(item);
    showThumbnail(img, neighbour.thumbnail);
  }
  $("legend").hidden = !known;
}

async function classify(form) {
  const section = $("classes");
  try {
    const answer = await api("/v1/classify", { method: "POST", body: form });
    const list = $("class-list");
    list.replaceChildren();
    for (const entry of answer.classes) {
      const item = document.createElement("li");
      const name = document.createElement("span");
      name.textContent = entry.label + " " + (100 * entry.probability).toFixed(1) + "%";
      const meter = document.createElement("meter");
      meter.min = 0;
      meter.max = 1;
      meter.value = entry.probability;
      meter.setAttribute("aria-label", entry.label);
      item.append(name, meter);
      list.append(item);
    }
    section.hidden = false;
  } catch (error) {
    section.hidden = true;
    setStatus(error.message, true);
  }
}

async function search() {
  if (!state.file) return;
  const k = Math.min(Math.max(parseInt($("k").value, 10) || 12, 1), 1000);
  const form = new FormData();
  form.append("image", state.file);
  form.append("k", String(k));
  const results = document.querySelector(".results");
  results.setAttribute("aria-busy", "true");
  setStatus("Searching…");
  try {
    const answer = await api("/v1/search", { method: "POST", body: form });
    forgetUrls();
    renderQuery(answer);
    renderNeighbours(answer);
    setStatus(answer.neighbours.length + " neighbours found.");
    if (state.info && state.info.classifier) {
      const image = new FormData();
      image.append("image", state.file);
      await classify(image);
    }
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    results.setAttribute("aria-busy", "false");
  }
}

function choose(file) {
  if (!file) return;
  state.file = file;
  const preview = $("query-image");
  if (preview.dataset.url) URL.revokeObjectURL(preview.dataset.url);
  preview.dataset.url = URL.createObjectURL(file);
  preview.src = preview.dataset.url;
  preview.alt = "Your query image: " + file.name;
  search();
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => choose(event.target.files[0]));
  $("k").addEventListener("change", search);
  for (const name of ["dragenter", "dragover"]) {
    document.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) drop.classList.remove("over");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    choose(event.dataTransfer.files[0]);
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    $("token-form").hidden = true;
    setStatus("");
    loadInfo().then(search);
  });
  loadInfo();
}

document.addEventListener("DOMContentLoaded", setUp);
