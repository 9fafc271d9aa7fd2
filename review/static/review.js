// booruset review: edits through the JSON API, keyboard navigation. Plain JS, no build step.
"use strict";

async function post(path, body) {
  const response = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify(body), credentials: "same-origin"});
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || response.statusText);
  return answer;
}

function say(text) { document.getElementById("status").textContent = text; }

function lastBatch(batch) { if (batch) sessionStorage.setItem("booruset-last-batch", batch); }

async function edit(body, then) {
  try {
    const answer = await post("api/edits", body);
    lastBatch(answer.batch);
    say(answer.edits ? `saved (${answer.edits} edits)` : "nothing to change");
    if (then) window.location.href = then; else window.location.reload();
  } catch (error) { say("not saved: " + error.message); }
}

function imagePage() {
  const page = document.getElementById("image-page");
  const key = page.dataset.key, next = page.dataset.next;
  const tagInput = document.getElementById("tag-input");
  tagInput.addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    const text = tagInput.value.trim();
    if (!text) return;
    if (text.startsWith("-")) edit({key, remove_tags: [text.slice(1).trim()]});
    else edit({key, add_tags: [text.replace(/^\+/, "").trim()]});
  });
  for (const row of document.querySelectorAll("#tags tr.tag")) {
    const tag = row.dataset.tag;
    row.querySelector(".remove-tag")?.addEventListener("click", () => edit({key, remove_tags: [tag]}));
    row.querySelector(".add-tag")?.addEventListener("click", () => edit({key, add_tags: [tag]}));
    row.addEventListener("keydown", (event) => {
      if ((event.key === "Delete" || event.key === "Backspace") && row.dataset.present === "yes") {
        event.preventDefault();
        edit({key, remove_tags: [tag]});
      }
    });
  }
  const toggle = document.getElementById("toggle-exclude");
  toggle.addEventListener("click", () => edit({key, exclude: toggle.dataset.exclude === "true"}));
  const duplicate = document.getElementById("toggle-duplicate");
  if (duplicate) {
    duplicate.addEventListener("click", () => edit({key, not_duplicate: duplicate.dataset.notDuplicate === "true"}));
  }
  document.getElementById("save-caption").addEventListener("click",
    () => edit({key, caption: document.getElementById("caption").value}));
  document.getElementById("reset-caption").addEventListener("click", () => edit({key, caption: ""}));
  document.getElementById("set-character").addEventListener("click",
    () => edit({key, character: document.getElementById("character-input").value}));
  for (const button of document.querySelectorAll("button.undo")) {
    button.addEventListener("click", () => undo(button.dataset.batch));
  }
  document.addEventListener("keydown", (event) => {
    const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName);
    if (event.key === "Escape") { if (typing) document.activeElement.blur(); else go("to-grid"); return; }
    if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === "j" || event.key === "ArrowRight") go("next-image");
    else if (event.key === "k" || event.key === "ArrowLeft") go("previous-image");
    else if (event.key === "a") edit({key, exclude: false}, next || undefined);
    else if (event.key === "x") edit({key, exclude: true}, next || undefined);
    else if (event.key === "t") { event.preventDefault(); tagInput.focus(); }
    else if (event.key === "u") undo(sessionStorage.getItem("booruset-last-batch"));
  });
}

function go(id) { const link = document.getElementById(id); if (link) window.location.href = link.href; }

async function undo(batch) {
  if (!batch) { say("nothing to undo"); return; }
  try {
    const answer = await post("api/undo", {batch});
    lastBatch(answer.batch);
    window.location.reload();
  } catch (error) { say("undo failed: " + error.message); }
}

function gridPage() {
  const form = document.getElementById("filters");
  const filter = () => Object.fromEntries(new FormData(form).entries());
  const action = () => {
    const remove = document.getElementById("bulk-remove").value.trim();
    const add = document.getElementById("bulk-add").value.trim();
    const exclude = document.getElementById("bulk-exclude").value;
    return {remove_tags: remove ? [remove] : [], add_tags: add ? [add] : [],
            exclude: exclude === "" ? null : exclude === "true"};
  };
  const result = document.getElementById("bulk-result");
  // apply only what the preview counted: any change to the filter or the action asks for a new preview
  for (const field of [...form.elements, ...document.querySelectorAll("#bulk input, #bulk select")]) {
    field.addEventListener("input", () => { document.getElementById("bulk-apply").disabled = true; });
  }
  const apply = document.getElementById("bulk-apply"), undoButton = document.getElementById("bulk-undo");
  document.getElementById("bulk-preview").addEventListener("click", async () => {
    try {
      const answer = await post("api/bulk", {...filter(), ...action(), preview: true});
      result.textContent = `${answer.count} images match`;
      apply.disabled = false;
    } catch (error) { result.textContent = error.message; }
  });
  apply.addEventListener("click", async () => {
    try {
      const answer = await post("api/bulk", {...filter(), ...action(), preview: false});
      result.textContent = `${answer.edits} edits on ${answer.images} images`;
      lastBatch(answer.batch);
      undoButton.dataset.batch = answer.batch || "";
      undoButton.disabled = !answer.batch;
      apply.disabled = true;
    } catch (error) { result.textContent = error.message; }
  });
  undoButton.addEventListener("click", async () => {
    try {
      const answer = await post("api/undo", {batch: undoButton.dataset.batch});
      result.textContent = `undone (${answer.edits} edits)`;
      undoButton.disabled = true;
    } catch (error) { result.textContent = error.message; }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "image") imagePage();
  if (document.body.dataset.page === "grid") gridPage();
});
