// The leaderboard: GET /v1/leaderboard, a table and a canvas chart of ratings with their 95 % intervals.
"use strict";

const $ = (id) => document.getElementById(id);
const fixed = (x, digits = 0) => (x == null ? "–" : x.toFixed(digits));

function drawChart(models) {
  const canvas = $("chart");
  const scale = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width;
  const rowHeight = 34;
  const height = Math.max(80, 40 + rowHeight * models.length);
  canvas.width = width * scale;
  canvas.height = height * scale;
  canvas.style.height = height + "px";
  const ctx = canvas.getContext("2d");
  ctx.scale(scale, scale);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "13px system-ui, sans-serif";
  if (!models.length) {
    ctx.fillStyle = "#667085";
    ctx.fillText("No votes yet: vote in the arena.", 12, 30);
    return;
  }
  const low = Math.min(...models.map((m) => m.ci_low));
  const high = Math.max(...models.map((m) => m.ci_high));
  const pad = Math.max(20, (high - low) * 0.08);
  const min = low - pad, max = high + pad;
  const left = 170, right = width - 20;
  const x = (value) => left + ((value - min) / (max - min)) * (right - left);
  ctx.strokeStyle = "#d9dee7";
  ctx.fillStyle = "#667085";
  const step = Math.pow(10, Math.floor(Math.log10((max - min) / 4)));
  for (let tick = Math.ceil(min / step) * step; tick <= max; tick += step) {
    ctx.beginPath(); ctx.moveTo(x(tick), 10); ctx.lineTo(x(tick), height - 22); ctx.stroke();
    ctx.fillText(tick.toFixed(0), x(tick) - 12, height - 6);
  }
  models.forEach((model, i) => {
    const y = 24 + i * rowHeight;
    ctx.fillStyle = "#1d2330";
    ctx.fillText(model.model, 8, y + 4);
    ctx.strokeStyle = "#2f6fdf";
    ctx.lineWidth = 2;
    ctx.beginPath(); ctx.moveTo(x(model.ci_low), y); ctx.lineTo(x(model.ci_high), y); ctx.stroke();
    for (const end of [model.ci_low, model.ci_high]) {
      ctx.beginPath(); ctx.moveTo(x(end), y - 6); ctx.lineTo(x(end), y + 6); ctx.stroke();
    }
    ctx.fillStyle = "#2f6fdf";
    ctx.beginPath(); ctx.arc(x(model.rating), y, 5, 0, 2 * Math.PI); ctx.fill();
    ctx.lineWidth = 1;
  });
  canvas.dataset.drawn = String(models.length);
}

function row(cells) {
  return gateway.el("tr", {}, ...cells.map((c) => gateway.el("td", {}, String(c))));
}

async function load() {
  const board = await gateway.call("GET", "/v1/leaderboard");
  $("summary").textContent = `${board.battles} battles · ${board.bootstrap_rounds} bootstrap rounds`;
  $("ratings").tBodies[0].replaceChildren(...board.models.map((m, i) => row([
    i + 1, m.model, fixed(m.rating), `${fixed(m.ci_low)} – ${fixed(m.ci_high)}`, m.battles,
    `${m.wins} / ${m.losses} / ${m.ties}`, (100 * m.win_rate).toFixed(0) + " %",
  ])));
  $("variants").tBodies[0].replaceChildren(...board.variants.map((v) => row([
    v.route || "–", v.model, v.requests, v.errors,
    v.latency_p50_s == null ? "–" : fixed(v.latency_p50_s * 1000) + " ms",
    v.latency_p95_s == null ? "–" : fixed(v.latency_p95_s * 1000) + " ms",
    v.completion_tokens, v.scores,
    v.mean_score == null ? "–" : fixed(v.mean_score, 2) +
      (v.score_ci_low == null ? "" : ` (${fixed(v.score_ci_low, 2)} – ${fixed(v.score_ci_high, 2)})`),
  ])));
  drawChart(board.models);
}

document.addEventListener("DOMContentLoaded", () => load().catch((error) => { $("status").textContent = error.message; }));
