// The prediction page: shows the served model, sends each dropped image to the prediction API, draws the answers.
"use strict";

const page = {
  model: null,        // The metadata route's answer, once the model is loaded.
  cards: [],          // One entry per image: {element, probabilities, error}.
};

const $ = (selector) => document.querySelector(selector);

function setStatus(text, kind) {
  const status = $("#status");
  status.textContent = text;
  status.className = `status status-${kind}`;
}

async function waitForModel() {
  // The server answers before its model is loaded; the health route says when it is (200) or not yet (503).
  for (;;) {
    try {
      const response = await fetch("/healthz", {cache: "no-store"});
      const answer = await response.json();
      if (response.ok) return answer.model;
      setStatus(response.status === 503 ? "Loading the model…" : `Server error: ${answer.error}`,
                response.status === 503 ? "loading" : "error");
    } catch (error) {
      setStatus("Cannot reach the server; retrying…", "error");
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

async function loadModel() {
  const name = await waitForModel();
  const response = await fetch(`/v1/models/${encodeURIComponent(name)}/metadata`, {cache: "no-store"});
  page.model = await response.json();
  showModel(page.model);
  setStatus(`Ready · ${page.model.model.name}`, "ready");
  $("#top-k").value = String(Math.min(Number($("#top-k").value), page.model.model.classes.length));
}

function percent(value) {
  return `${(100 * value).toFixed(value >= 0.995 || value < 0.001 ? 0 : 1)}%`;
}

function showModel(metadata) {
  const model = metadata.model;
  $("#model-name").textContent = model.name;
  $("#model-network").textContent = model.network || "unknown";
  $("#model-recipe").textContent = model.recipe || "none (flags)";
  $("#model-accuracy").textContent = model.test_accuracy == null ? "not recorded"
    : `${(100 * model.test_accuracy).toFixed(2)}%`;
  $("#model-test-split").textContent = model.test_split ? `${model.dataset} ${model.test_split}` : "";
  $("#model-input").textContent = `${model.image_shape[0]}×${model.image_shape[1]}, ${model.image_shape[2] === 1 ? "grey" : "RGB"}`;
  const classes = $("#model-classes");
  classes.replaceChildren(...model.classes.map((name) => {
    const chip = document.createElement("li");
    chip.textContent = name;
    return chip;
  }));
  $("#model").hidden = false;
  $("#curl-example").textContent = `curl -H 'Content-Type: application/json' -d '{"instances": [{"b64": "'"$(base64 -w0 photo.jpg)"'"}]}' `
    + `${location.origin}${metadata.serving.predict_route}`;
}

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function newCard(file) {
  const element = $("#card-template").content.firstElementChild.cloneNode(true);
  element.dataset.file = file.name;
  element.dataset.state = "pending";
  element.classList.add("pending");
  element.querySelector(".file-name").textContent = file.name;
  element.querySelector(".file-name").title = file.name;
  element.querySelector(".file-info").textContent = `${(file.size / 1024).toFixed(1)} KB`;
  element.querySelector(".card-message").textContent = "Classifying…";
  const image = element.querySelector("img");
  image.alt = file.name;
  image.onload = () => {
    // Tiny images (CIFAR's 32×32) stay sharp when enlarged.
    if (image.naturalWidth <= 64) image.classList.add("small");
    element.querySelector(".file-info").textContent =
      `${image.naturalWidth}×${image.naturalHeight} · ${(file.size / 1024).toFixed(1)} KB`;
  };
  image.onerror = () => { image.remove(); };
  image.src = URL.createObjectURL(file);
  $("#results").append(element);
  const card = {element, probabilities: null, error: null};
  page.cards.push(card);
  return card;
}

function drawBars(card) {
  const names = page.model.model.classes;
  const topK = Number($("#top-k").value);
  const ranked = names.map((name) => [name, card.probabilities[name]]).sort((a, b) => b[1] - a[1]).slice(0, topK);
  card.element.querySelector(".bars").replaceChildren(...ranked.map(([name, probability], rank) => {
    const row = document.createElement("li");
    row.className = rank === 0 ? "bar-row top" : "bar-row";
    row.dataset.class = name;
    row.dataset.probability = String(probability);
    row.innerHTML = '<span class="bar-label"></span><span class="bar-track"><span class="bar-fill"></span></span>'
      + '<span class="bar-value"></span>';
    row.querySelector(".bar-label").textContent = name;
    row.querySelector(".bar-fill").style.width = `${Math.max(100 * probability, 0.5)}%`;
    row.querySelector(".bar-value").textContent = percent(probability);
    return row;
  }));
}

function finish(card, probabilities, error) {
  card.element.classList.remove("pending");
  card.probabilities = probabilities;
  card.error = error;
  if (error) {
    card.element.classList.add("failed");
    card.element.dataset.state = "failed";
    card.element.querySelector(".card-message").textContent = error;
  } else {
    card.element.dataset.state = "done";
    card.element.querySelector(".card-message").textContent = "";
    drawBars(card);
  }
  updateSummary();
}

async function classify(file) {
  const card = newCard(file);
  updateSummary();
  try {
    const b64 = await readBase64(file);
    const body = JSON.stringify({instances: [{b64}]});
    const limit = page.model.serving.max_request_bytes;
    if (body.length > limit) {
      finish(card, null, `This file is too large for the server (${(body.length / 1048576).toFixed(1)} MB as base64; `
        + `the limit is ${(limit / 1048576).toFixed(1)} MB).`);
      return;
    }
    const response = await fetch(page.model.serving.predict_route, {
      method: "POST", headers: {"Content-Type": "application/json"}, body,
    });
    const answer = await response.json();
    if (!response.ok) {
      // The server names the instance; this card is the instance.
      finish(card, null, String(answer.error).replace(/^instances\[0\]: /, ""));
    } else {
      finish(card, answer.predictions[0].probabilities, null);
    }
  } catch (error) {
    finish(card, null, `The request failed: ${error.message || error}`);
  }
}

function updateSummary() {
  const done = page.cards.filter((card) => card.probabilities).length;
  const failed = page.cards.filter((card) => card.error).length;
  const pending = page.cards.length - done - failed;
  const parts = [`${page.cards.length} image${page.cards.length === 1 ? "" : "s"}`];
  if (done) parts.push(`${done} classified`);
  if (failed) parts.push(`${failed} failed`);
  if (pending) parts.push(`${pending} in progress`);
  $("#summary").textContent = page.cards.length ? parts.join(" · ") : "";
  $("#clear").disabled = page.cards.length === 0;
}

function addFiles(files) {
  if (!page.model) return;
  for (const file of files) classify(file);
}

function setUpInputs() {
  const dropzone = $("#dropzone");
  $("#files").addEventListener("change", (event) => {
    addFiles([...event.target.files]);
    event.target.value = "";  // Choosing the same files again classifies them again.
  });
  for (const name of ["dragenter", "dragover"]) {
    dropzone.addEventListener(name, (event) => { event.preventDefault(); dropzone.classList.add("dragging"); });
  }
  for (const name of ["dragleave", "drop"]) {
    dropzone.addEventListener(name, (event) => { event.preventDefault(); dropzone.classList.remove("dragging"); });
  }
  // Files dropped anywhere on the page count (the drop zone's drop bubbles up to here); the browser would otherwise
  // leave the page to show them.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    addFiles([...event.dataTransfer.files]);
  });
  $("#top-k").addEventListener("change", () => page.cards.filter((card) => card.probabilities).forEach(drawBars));
  $("#clear").addEventListener("click", () => {
    for (const card of page.cards) URL.revokeObjectURL(card.element.querySelector("img")?.src);
    page.cards = [];
    $("#results").replaceChildren();
    updateSummary();
  });
}

setUpInputs();
loadModel();
