// Shared by the pages: the API key (kept in local storage), JSON calls, and reading an SSE stream from fetch.
"use strict";

const gateway = {
  key() { return localStorage.getItem("gateway-api-key") || ""; },

  headers() {
    const headers = { "Content-Type": "application/json" };
    if (gateway.key()) headers["Authorization"] = "Bearer " + gateway.key();
    return headers;
  },

  async call(method, path, body) {
    const response = await fetch(path, {
      method, headers: gateway.headers(), body: body === undefined ? undefined : JSON.stringify(body),
    });
    const data = await response.json();
    if (!response.ok) throw new Error((data.error && data.error.message) || response.statusText);
    return data;
  },

  // POST `body` and call `onEvent(object)` for every `data:` event until `[DONE]`.
  async stream(path, body, onEvent) {
    const response = await fetch(path, { method: "POST", headers: gateway.headers(), body: JSON.stringify(body) });
    if (!response.ok) {
      const data = await response.json();
      throw new Error((data.error && data.error.message) || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
        if (!data) continue;
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  },

  // The key field in the page header: stored on change.
  setupKey() {
    const input = document.getElementById("api-key");
    if (!input) return;
    input.value = gateway.key();
    input.addEventListener("change", () => localStorage.setItem("gateway-api-key", input.value.trim()));
  },

  el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === "class") node.className = value; else node.setAttribute(name, value);
    }
    for (const child of children) node.append(child);
    return node;
  },

  figures(metrics) {
    if (!metrics) return "";
    const ttft = metrics.ttft_s == null ? "–" : (metrics.ttft_s * 1000).toFixed(0) + " ms";
    const speed = metrics.tokens_per_s == null ? "–" : metrics.tokens_per_s.toFixed(1) + " tok/s";
    return `TTFT ${ttft} · ${speed} · ${metrics.completion_tokens} tokens · ${metrics.total_s.toFixed(2)} s`;
  },
};

document.addEventListener("DOMContentLoaded", gateway.setupKey);
