// The compare page: one message to 2-4 models through POST /v1/compare (streamed), answers in columns.
"use strict";

const state = { models: [], chosen: [], turns: [], columns: {} };  // turns: [{user, answers: {model: text}}]
const $ = (id) => document.getElementById(id);

async function loadModels() {
  const list = await gateway.call("GET", "/v1/models");
  state.models = list.data.map((m) => m.id);
  const box = $("models");
  state.models.forEach((id, i) => {
    const input = gateway.el("input", { type: "checkbox", value: id, "data-model": id });
    input.checked = i < 2;
    input.addEventListener("change", render);
    box.append(gateway.el("label", {}, input, " " + id));
  });
  render();
}

function chosenModels() {
  return [...document.querySelectorAll("#models input:checked")].map((i) => i.value);
}

// Each model's own history: the shared user turns and that model's earlier answers.
function history(model, message) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const turn of state.turns) {
    messages.push({ role: "user", content: turn.user });
    messages.push({ role: "assistant", content: turn.answers[model] || "" });
  }
  messages.push({ role: "user", content: message });
  return messages;
}

function render() {
  state.chosen = chosenModels();
  const columns = $("columns");
  columns.replaceChildren();
  state.columns = {};
  for (const model of state.chosen) {
    const column = gateway.el("div", { class: "column", "data-model": model });
    column.append(gateway.el("h2", {}, gateway.el("span", {}, model)));
    for (const turn of state.turns) {
      column.append(gateway.el("div", { class: "turn user" }, "› " + turn.user));
      column.append(gateway.el("div", { class: "turn answer" }, turn.answers[model] || ""));
    }
    columns.append(column);
    state.columns[model] = column;
  }
  for (const id of ["diff-a", "diff-b"]) {
    const select = $(id);
    const keep = select.value;
    select.replaceChildren(...state.chosen.map((m) => gateway.el("option", { value: m }, m)));
    if (state.chosen.includes(keep)) select.value = keep;
  }
  if (state.chosen.length > 1 && $("diff-a").value === $("diff-b").value) $("diff-b").value = state.chosen[1];
  $("send").disabled = state.chosen.length < 2 || state.chosen.length > 4;
  $("status").textContent = state.chosen.length < 2 || state.chosen.length > 4 ? "pick 2 to 4 models" : "";
  showDiff();
}

function showDiff() {
  const last = state.turns[state.turns.length - 1];
  const out = $("diff");
  out.replaceChildren();
  if (!last) return;
  const a = last.answers[$("diff-a").value] || "";
  const b = last.answers[$("diff-b").value] || "";
  for (const part of Diff.diffWords(a, b)) {
    out.append(part.added ? gateway.el("ins", {}, part.value)
      : part.removed ? gateway.el("del", {}, part.value) : document.createTextNode(part.value));
  }
}

async function send() {
  const message = $("message").value.trim();
  if (!message) return;
  const models = state.chosen;
  const turn = { user: message, answers: {} };
  const cells = {};
  for (const model of models) {
    const column = state.columns[model];
    column.append(gateway.el("div", { class: "turn user" }, "› " + message));
    const reasoning = gateway.el("div", { class: "reasoning" });
    const answer = gateway.el("div", { class: "turn answer" });
    const figures = gateway.el("div", { class: "figures" }, "…");
    const prompt = gateway.el("pre", { class: "prompt", hidden: "" });
    column.append(reasoning, answer, figures, prompt);
    cells[model] = { reasoning, answer, figures, prompt };
    turn.answers[model] = "";
  }
  const modelMessages = Object.fromEntries(models.map((m) => [m, history(m, message)]));
  const body = {
    models, messages: modelMessages[models[0]], model_messages: modelMessages, stream: true,
    temperature: Number($("temperature").value), top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  $("send").disabled = true;
  $("status").textContent = "";
  try {
    await gateway.stream("/v1/compare", body, (event) => {
      const cell = cells[event.model];
      if (event.chunk) {
        for (const choice of event.chunk.choices) {
          const delta = choice.delta || {};
          if (delta.content) { turn.answers[event.model] += delta.content; cell.answer.textContent += delta.content; }
          if (delta.reasoning_content) cell.reasoning.textContent += delta.reasoning_content;
          if (delta.tool_calls) cell.answer.textContent += JSON.stringify(delta.tool_calls);
        }
      } else if (event.result) {
        const result = event.result;
        cell.figures.textContent = result.error ? "" : gateway.figures(result.metrics);
        if (result.error) cell.answer.append(gateway.el("span", { class: "error" }, result.error.message));
        cell.prompt.textContent = result.prompt || "";
        cell.prompt.hidden = !$("show-prompt").checked;
      }
    });
  } catch (error) {
    $("status").textContent = error.message;
  }
  state.turns.push(turn);
  $("message").value = "";
  $("send").disabled = false;
  showDiff();
}

document.addEventListener("DOMContentLoaded", () => {
  $("send").addEventListener("click", send);
  $("message").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
  $("reset").addEventListener("click", () => { state.turns = []; render(); });
  $("diff-a").addEventListener("change", showDiff);
  $("diff-b").addEventListener("change", showDiff);
  $("show-prompt").addEventListener("change", () => {
    for (const p of document.querySelectorAll("pre.prompt")) p.hidden = !$("show-prompt").checked;
  });
  loadModels().catch((error) => { $("status").textContent = error.message; });
});
