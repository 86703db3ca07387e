// The blind arena: POST /v1/compare with blind=true (two anonymous slots), then POST /v1/feedback reveals names.
"use strict";

const $ = (id) => document.getElementById(id);
const round = { ids: {}, done: 0 };
const voteButtons = () => document.querySelectorAll(".votes button");

function clear() {
  round.ids = {};
  round.done = 0;
  for (const slot of ["A", "B"]) {
    $("answer-" + slot).textContent = "";
    $("figures-" + slot).textContent = "";
    $("name-" + slot).textContent = "";
  }
  $("voted").textContent = "";
  $("status").textContent = "";
  for (const button of voteButtons()) button.disabled = true;
}

async function send() {
  const message = $("message").value.trim();
  if (!message) return;
  clear();
  $("send").disabled = true;
  try {
    await gateway.stream("/v1/compare", {
      blind: true, stream: true, temperature: 0.7, max_tokens: 256, messages: [{ role: "user", content: message }],
    }, (event) => {
      const slot = event.model;
      if (event.chunk) {
        for (const choice of event.chunk.choices) {
          if (choice.delta && choice.delta.content) $("answer-" + slot).textContent += choice.delta.content;
        }
      } else if (event.result) {
        round.ids[slot] = event.result.response_id;
        round.done += 1;
        if (event.result.error) $("answer-" + slot).textContent += " [" + event.result.error.message + "]";
        $("figures-" + slot).textContent = gateway.figures(event.result.metrics);
      }
    });
  } catch (error) {
    $("status").textContent = error.message;
    $("send").disabled = false;
    return;
  }
  const ready = round.ids.A && round.ids.B;
  for (const button of voteButtons()) button.disabled = !ready;
}

async function vote(outcome) {
  for (const button of voteButtons()) button.disabled = true;
  try {
    const answer = await gateway.call("POST", "/v1/feedback", { response_ids: [round.ids.A, round.ids.B], outcome });
    const names = Object.fromEntries(answer.revealed.map((r) => [r.response_id, r.model]));
    $("name-A").textContent = names[round.ids.A];
    $("name-B").textContent = names[round.ids.B];
    $("voted").textContent = "Vote recorded: " + { a: "A is better", b: "B is better", tie: "tie", both_bad: "both are bad" }[outcome];
  } catch (error) {
    $("status").textContent = error.message;
  }
  $("next").hidden = false;
}

document.addEventListener("DOMContentLoaded", () => {
  $("send").addEventListener("click", send);
  $("next").addEventListener("click", () => { clear(); $("message").value = ""; $("send").disabled = false; $("next").hidden = true; });
  for (const button of voteButtons()) button.addEventListener("click", () => vote(button.dataset.outcome));
});
