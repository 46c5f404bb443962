// The chat page: keeps the conversation in OpenAI's message format, sends it to this server's
// /v1/chat/completions with streaming, and draws the reply as it arrives. Model text only ever
// reaches the page as text nodes (textContent / renderMarkdown's DOM), never as HTML.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "minicpmv.apiKey";
  const SETTINGS = ["thinking", "markdown", "newlines", "temperature", "top-p", "top-k", "max-tokens", "seed",
                    "system", "tools", "extra"];
  const state = { history: [], attachments: [], controller: null, apiKey: localStorage.getItem(KEY_STORE) || "" };

  // -- API ------------------------------------------------------------------------------------
  function headers() {
    const h = { "Content-Type": "application/json" };
    if (state.apiKey) h.Authorization = "Bearer " + state.apiKey;
    return h;
  }

  async function apiError(response) {
    let message = response.statusText || "request failed";
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON: keep the status text */ }
    const err = new Error("HTTP " + response.status + ": " + message);
    err.status = response.status;
    return err;
  }

  async function loadModels() {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) { askKey(loadModels); return; }
    if (!response.ok) throw await apiError(response);
    const select = $("model");
    const current = select.value;
    select.replaceChildren(...(await response.json()).data.map((m) => new Option(m.id, m.id)));
    if (current) select.value = current;
    select.disabled = false;
  }

  function askKey(then) {
    const dialog = $("key-dialog");
    $("key-input").value = state.apiKey;
    dialog.onclose = () => {
      if (dialog.returnValue !== "save") return;
      state.apiKey = $("key-input").value.trim();
      localStorage.setItem(KEY_STORE, state.apiKey);
      if (then) then().catch(showError);
    };
    if (!dialog.open) dialog.showModal();
  }

  // -- settings -------------------------------------------------------------------------------
  function loadSettings() {
    const saved = JSON.parse(localStorage.getItem("minicpmv.settings") || "{}");
    for (const id of SETTINGS) {
      if (!(id in saved)) continue;
      const input = $(id);
      if (input.type === "checkbox") input.checked = saved[id]; else input.value = saved[id];
    }
  }

  function saveSettings() {
    const saved = {};
    for (const id of SETTINGS) { const input = $(id); saved[id] = input.type === "checkbox" ? input.checked : input.value; }
    localStorage.setItem("minicpmv.settings", JSON.stringify(saved));
  }

  function parseJson(id, what, check) {
    const text = $(id).value.trim();
    if (!text) return null;
    let value;
    try { value = JSON.parse(text); } catch (e) { throw new Error(what + " is not valid JSON: " + e.message); }
    if (!check(value)) throw new Error(what + " has the wrong shape");
    return value;
  }

  function requestBody() {
    const body = { model: $("model").value, messages: [], stream: true, stream_options: { include_usage: true } };
    const system = $("system").value.trim();
    if (system) body.messages.push({ role: "system", content: system });
    body.messages.push(...state.history);
    const num = (id, key, parse) => { const v = $(id).value.trim(); if (v !== "") body[key] = parse(v); };
    num("temperature", "temperature", parseFloat);
    num("top-p", "top_p", parseFloat);
    num("top-k", "top_k", (v) => parseInt(v, 10));
    num("max-tokens", "max_tokens", (v) => parseInt(v, 10));
    num("seed", "seed", (v) => parseInt(v, 10));
    body.chat_template_kwargs = { enable_thinking: $("thinking").checked };
    const tools = parseJson("tools", "Tools", Array.isArray);
    if (tools) body.tools = tools;
    const extra = parseJson("extra", "Extra request fields", (v) => v && typeof v === "object" && !Array.isArray(v));
    if (extra) Object.assign(body, extra);
    return body;
  }

  // -- attachments ----------------------------------------------------------------------------
  function readDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new Error("could not read " + file.name));
      reader.readAsDataURL(file);
    });
  }

  async function attach(files) {
    for (const file of files) {
      const kind = file.type.startsWith("image/") ? "image" : file.type.startsWith("video/") ? "video" : null;
      if (!kind) { showError("'" + file.name + "' is not an image or a video"); continue; }
      state.attachments.push({ kind, name: file.name, url: await readDataUrl(file), preview: URL.createObjectURL(file) });
    }
    drawAttachments();
  }

  function thumb(item, onRemove) {
    const media = document.createElement(item.kind === "image" ? "img" : "video");
    media.src = item.kind === "video" ? item.preview + "#t=0.1" : item.preview;  // a video shows a frame, not black
    if (item.kind === "image") media.alt = item.name; else { media.muted = true; media.preload = "metadata"; }
    const box = document.createElement("div");
    box.className = "thumb " + item.kind;
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = item.name;
    name.title = item.name;
    box.append(media, name);
    if (onRemove) {
      const x = document.createElement("button");
      x.type = "button";
      x.className = "remove";
      x.textContent = "×";
      x.title = "remove";
      x.onclick = onRemove;
      box.append(x);
    }
    return box;
  }

  function drawAttachments() {
    const box = $("attachments");
    box.className = state.attachments.length ? "thumbs" : "";
    box.replaceChildren(...state.attachments.map((item, k) => thumb(item, () => {
      state.attachments.splice(k, 1);
      drawAttachments();
    })));
  }

  // -- thread ---------------------------------------------------------------------------------
  function addMessage(cls) {
    const node = document.createElement("div");
    node.className = "msg " + cls;
    $("thread").append(node);
    node.scrollIntoView({ block: "end" });
    return node;
  }

  function drawUser(text, attachments) {
    const node = addMessage("user");
    if (attachments.length) {
      const thumbs = document.createElement("div");
      thumbs.className = "thumbs";
      thumbs.append(...attachments.map((a) => thumb(a)));
      node.append(thumbs);
    }
    node.append(document.createTextNode(text));
    return node;
  }

  class AssistantView {
    constructor() {
      this.node = addMessage("assistant");
      this.reasoning = document.createElement("details");
      this.reasoning.className = "reasoning";
      this.reasoning.hidden = true;
      const summary = document.createElement("summary");
      summary.textContent = "Thinking";
      this.reasoningText = document.createElement("div");
      this.reasoningText.className = "reasoning-text";
      this.reasoning.append(summary, this.reasoningText);
      this.answer = document.createElement("div");
      this.answer.className = "answer";
      this.tools = document.createElement("div");
      this.meta = document.createElement("div");
      this.meta.className = "meta";
      this.node.append(this.reasoning, this.answer, this.tools, this.meta);
      this.pending = false;
    }

    display(text) { return $("newlines").checked ? window.unescapeNewlines(text) : text; }

    update(reply) {  // redraw at most once per frame
      this.reply = reply;
      if (this.pending) return;
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.draw(); });
    }

    draw() {
      const r = this.reply;
      if (r.reasoning) {
        this.reasoning.hidden = false;
        this.reasoningText.textContent = this.display(r.reasoning);
      }
      const text = this.display(r.content);
      this.answer.dataset.text = text;
      if ($("markdown").checked) {
        this.answer.classList.remove("plain");
        this.answer.replaceChildren(window.renderMarkdown(text));
      } else {
        this.answer.classList.add("plain");
        this.answer.textContent = text;
      }
      this.tools.replaceChildren(...r.toolCalls.filter(Boolean).map(toolCallView));
    }

    finish(reply, note) {
      this.reply = reply;
      this.draw();
      const copy = document.createElement("button");
      copy.type = "button";
      copy.className = "copy";
      copy.textContent = "Copy";
      copy.onclick = () => copyText(this.display(reply.content), copy);
      const info = document.createElement("span");
      const parts = [note || reply.finish || ""];
      if (reply.usage) parts.push(reply.usage.prompt_tokens + " prompt + " + reply.usage.completion_tokens + " tokens");
      info.textContent = parts.filter(Boolean).join(" · ");
      this.meta.replaceChildren(copy, info);
      this.node.dataset.finish = note || reply.finish || "";
    }
  }

  function toolCallView(call) {
    const box = document.createElement("div");
    box.className = "tool-call";
    const fn = document.createElement("div");
    fn.className = "fn";
    fn.textContent = "tool call: " + call.name;
    const args = document.createElement("pre");
    try { args.textContent = JSON.stringify(JSON.parse(call.arguments), null, 2); } catch (_) { args.textContent = call.arguments; }
    box.append(fn, args);
    return box;
  }

  async function copyText(text, button) {
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch (_) {
      button.textContent = "Copy failed";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  }

  function showError(err) {
    const box = $("error");
    box.textContent = typeof err === "string" ? err : err.message;
    box.hidden = false;
  }

  // -- one turn -------------------------------------------------------------------------------
  async function send() {
    const text = $("prompt").value.trim();
    if (!text && !state.attachments.length) return;
    $("error").hidden = true;
    let body;
    try { body = requestBody(); } catch (e) { showError(e); return; }
    const content = state.attachments.map((a) => a.kind === "image"
      ? { type: "image_url", image_url: { url: a.url } } : { type: "video_url", video_url: { url: a.url } });
    if (text) content.push({ type: "text", text });
    const turn = { role: "user", content };
    body.messages.push(turn);
    const userNode = drawUser(text, state.attachments);
    const sent = state.attachments;
    state.attachments = [];
    drawAttachments();
    $("prompt").value = "";
    const view = new AssistantView();
    const reply = { content: "", reasoning: "", toolCalls: [], finish: null, usage: null };
    busy(true);
    state.controller = new AbortController();
    try {
      const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                             signal: state.controller.signal });
      if (!response.ok) throw await apiError(response);
      await readStream(response, reply, view);
      view.finish(reply);
      state.history.push(turn, assistantMessage(reply));
    } catch (e) {
      if (e.name === "AbortError") {
        view.finish(reply, "stopped");
        state.history.push(turn, assistantMessage(reply));
      } else {
        // the turn did not happen: show why, and give the text and attachments back to retry
        userNode.remove();
        view.node.remove();
        const node = addMessage("error");
        node.textContent = e.message;
        $("prompt").value = text;
        state.attachments = sent.concat(state.attachments);
        drawAttachments();
        if (e.status === 401) askKey(null);
      }
    } finally {
      state.controller = null;
      busy(false);
    }
  }

  function assistantMessage(reply) {
    const message = { role: "assistant", content: reply.content };
    const calls = reply.toolCalls.filter(Boolean);
    if (calls.length) {
      message.tool_calls = calls.map((c) => ({ id: c.id, type: "function", function: { name: c.name, arguments: c.arguments } }));
    }
    return message;
  }

  async function readStream(response, reply, view) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          apply(JSON.parse(data), reply);
        }
        view.update(reply);
      }
    }
  }

  function apply(chunk, reply) {
    if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
    if (chunk.usage) reply.usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      if (choice.index !== 0) continue;
      const d = choice.delta || {};
      if (d.content) reply.content += d.content;
      if (d.reasoning_content) reply.reasoning += d.reasoning_content;
      for (const call of d.tool_calls || []) {
        const known = reply.toolCalls[call.index] || { id: call.id, name: "", arguments: "" };
        if (call.function && call.function.name) known.name = call.function.name;
        if (call.function && call.function.arguments) known.arguments += call.function.arguments;
        reply.toolCalls[call.index] = known;
      }
      if (choice.finish_reason) reply.finish = choice.finish_reason;
    }
  }

  function busy(on) {
    $("send").hidden = on;
    $("stop").hidden = !on;
    document.body.dataset.busy = on ? "1" : "";
  }

  // -- wiring ---------------------------------------------------------------------------------
  function wire() {
    loadSettings();
    for (const id of SETTINGS) $(id).addEventListener("change", saveSettings);
    $("settings-toggle").onclick = () => {
      const panel = $("settings");
      panel.hidden = !panel.hidden;
      $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
    };
    $("send").onclick = send;
    $("stop").onclick = () => { if (state.controller) state.controller.abort(); };
    $("new-chat").onclick = () => {
      if (state.controller) state.controller.abort();
      state.history = [];
      $("thread").replaceChildren();
      $("error").hidden = true;
    };
    $("key-change").onclick = () => askKey(loadModels);
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); if (!state.controller) send(); }
    });
    $("prompt").addEventListener("input", () => {
      const p = $("prompt");
      p.style.height = "auto";
      p.style.height = p.scrollHeight + "px";
    });
    $("prompt").addEventListener("paste", (e) => {
      const files = [...(e.clipboardData ? e.clipboardData.files : [])];
      if (files.length) { e.preventDefault(); attach(files).catch(showError); }
    });
    $("attach").addEventListener("change", (e) => { attach([...e.target.files]).catch(showError); e.target.value = ""; });
    let depth = 0;
    document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; $("drop-hint").hidden = false; });
    document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop-hint").hidden = true; } });
    document.addEventListener("dragover", (e) => e.preventDefault());
    document.addEventListener("drop", (e) => {
      e.preventDefault();
      depth = 0;
      $("drop-hint").hidden = true;
      attach([...e.dataTransfer.files]).catch(showError);
    });
    loadModels().catch(showError);
  }

  document.addEventListener("DOMContentLoaded", wire);
})();
