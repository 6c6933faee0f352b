// tokenloom web page: a chat (text, image and audio upload, streamed answers with images drawn row by
// row and speech played back), sampling settings, and a text-to-image gallery. Plain JS, no build step,
// no external resources.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SETTINGS_KEY = "tokenloom.settings.v1";
  const DISPLAY_TARGET = 256; // upscale pixel art to about this many CSS pixels (integer factors)
  const MAX_UPLOAD_SIDE = 1024; // larger uploads are scaled down before sending
  const GALLERY_BATCH = 4;      // images per /v1/images/generations request (the server's default limit)
  const GALLERY_SEED_STRIDE = 1000; // seed offset between batches (draw j of a request uses seed + j)
  const AUDIO_RATE = 24000;     // the server's audio: 24 kHz mono (OpenAI's), streamed as 16-bit little-endian PCM

  const state = {
    model: null,          // id from GET /v1/models
    conversation: [],     // OpenAI-style messages, resent each turn
    attachments: [],      // [{kind: "image", url, name} | {kind: "audio", url, data, format, name}] for the next message
    hears: false,         // the model reads input_audio (its card's input_modalities)
    seesVideo: false,     // the model reads an animated GIF / WebP as a video (its card's input_modalities)
    speaks: false,        // the model answers with audio (its card's output_modalities)
    controller: null,     // AbortController of the running chat request
    runs: 0,              // gallery runs so far
  };

  // ---------- small helpers ----------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children) if (child != null) node.append(child);
    return node;
  }

  // Scale an <img> of pixel art up by a whole factor once its natural size is known.
  function upscale(img, target = DISPLAY_TARGET) {
    const apply = () => {
      const w = img.naturalWidth, h = img.naturalHeight;
      if (!w || !h) return;
      const factor = Math.max(1, Math.floor(target / Math.max(w, h)));
      img.style.width = `${w * factor}px`;
      img.dataset.scale = String(factor);
    };
    if (img.complete && img.naturalWidth) apply();
    img.addEventListener("load", apply);
  }

  async function errorMessage(response) {
    let text = "";
    try {
      text = await response.text();
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return body.error.message;
    } catch (_) { /* not JSON */ }
    const busy = response.status === 429 ? " (the server is busy: its queue is full, try again shortly)" : "";
    return `HTTP ${response.status} ${response.statusText || ""}${busy}${text ? `: ${text.slice(0, 300)}` : ""}`.trim();
  }

  function fileName(prefix, index) {
    const stamp = new Date().toISOString().replace(/[:.]/g, "-").slice(0, 19);
    return `${prefix}-${stamp}${index != null ? `-${index + 1}` : ""}.png`;
  }

  // ---------- audio ----------

  function base64ToBytes(b64) {
    const text = atob(b64);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return bytes;
  }

  function bytesToBase64(bytes) {
    let text = "";
    for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(text);
  }

  // Raw 16-bit little-endian PCM (mono, AUDIO_RATE) -> the bytes of a WAV file.
  function wavBytes(pcm) {
    const out = new Uint8Array(44 + pcm.length);
    const view = new DataView(out.buffer);
    const ascii = (at, text) => { for (let i = 0; i < text.length; i++) out[at + i] = text.charCodeAt(i); };
    ascii(0, "RIFF"); view.setUint32(4, 36 + pcm.length, true); ascii(8, "WAVE");
    ascii(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
    view.setUint32(24, AUDIO_RATE, true); view.setUint32(28, AUDIO_RATE * 2, true);
    view.setUint16(32, 2, true); view.setUint16(34, 16, true);
    ascii(36, "data"); view.setUint32(40, pcm.length, true);
    out.set(pcm, 44);
    return out;
  }

  // ---------- server status ----------

  // The key of a server started with --api-key: kept for this tab only (sessionStorage), sent as a
  // Bearer token with every API call.
  const KEY_STORE = "tokenloom.api-key";

  function apiHeaders(extra) {
    const key = $("s-api-key").value.trim();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
  }

  async function refreshStatus() {
    const text = $("server-status-text");
    const box = $("server-status");
    try {
      const health = await fetch("/health", { cache: "no-store" });
      if (!health.ok) throw new Error(`HTTP ${health.status}`);
      if (!state.model) {
        const models = await fetch("/v1/models", { cache: "no-store", headers: apiHeaders() });
        if (models.ok) {
          const body = await models.json();
          if (body && Array.isArray(body.data) && body.data.length) {
            const card = body.data[0];
            state.model = card.id;
            state.hears = Array.isArray(card.input_modalities) && card.input_modalities.includes("audio");
            state.seesVideo = Array.isArray(card.input_modalities) && card.input_modalities.includes("video");
            state.speaks = Array.isArray(card.output_modalities) && card.output_modalities.includes("audio");
            applyCapabilities();
          }
        }
      }
      box.dataset.state = "ok";
      text.textContent = state.model ? `ready · ${state.model}` : "ready";
    } catch (err) {
      box.dataset.state = "down";
      text.textContent = "server unreachable";
    }
  }

  // Show the audio upload and the "Speech" answer only for a model that hears and speaks.
  function applyCapabilities() {
    $("attach-audio").hidden = !state.hears;
    $("modality-speech").hidden = !state.speaks;
    const speech = document.querySelector('input[name="modalities"][value="audio"]');
    if (!state.speaks && speech.checked) document.querySelector('input[name="modalities"][value="both"]').checked = true;
  }

  // ---------- tabs and panels ----------

  function setupTabs() {
    const tabs = [$("tab-chat"), $("tab-gallery")];
    const select = (tab) => {
      for (const t of tabs) {
        const on = t === tab;
        t.setAttribute("aria-selected", String(on));
        t.tabIndex = on ? 0 : -1;
        $(t.getAttribute("aria-controls")).hidden = !on;
      }
      tab.focus();
    };
    tabs.forEach((tab, i) => {
      tab.addEventListener("click", () => select(tab));
      tab.addEventListener("keydown", (e) => {
        if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
          e.preventDefault();
          select(tabs[(i + (e.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length]);
        }
      });
    });
    const toggle = $("settings-toggle");
    const narrow = window.matchMedia("(max-width: 860px)");
    const setOpen = (open) => {
      toggle.setAttribute("aria-expanded", String(open));
      document.body.classList.toggle("settings-closed", !open);
    };
    setOpen(!narrow.matches);
    toggle.addEventListener("click", () => setOpen(toggle.getAttribute("aria-expanded") !== "true"));
  }

  // ---------- settings ----------

  const NUMBER_FIELDS = {
    temperature: "s-temperature",
    top_p: "s-top-p",
    top_k: "s-top-k",
    max_tokens: "s-max-tokens",
    image_temperature: "s-image-temperature",
    image_top_k: "s-image-top-k",
    guidance_scale: "s-guidance",
    width: "s-width",
    height: "s-height",
    seed: "s-seed",
  };
  const INTEGER_FIELDS = new Set(["top_k", "max_tokens", "image_top_k", "width", "height", "seed"]);

  function modalities() {
    const checked = document.querySelector('input[name="modalities"]:checked');
    const value = checked ? checked.value : "both";
    if (value === "audio" && !state.speaks) return ["text", "image"];
    return value === "both" ? ["text", "image"] : [value];
  }

  // The sampling fields that are filled in, as request parameters; throws on an invalid entry.
  function samplingParams() {
    const params = {};
    for (const [name, id] of Object.entries(NUMBER_FIELDS)) {
      const input = $(id);
      const raw = input.value.trim();
      if (raw === "") continue;
      if (input.validity && !input.validity.valid) {
        const label = document.querySelector(`label[for="${id}"]`);
        const group = input.closest("fieldset")?.querySelector("legend")?.textContent || "";
        throw new Error(`Settings: ${group} ${label ? label.textContent : name} is not valid (${input.validationMessage || raw})`);
      }
      const value = Number(raw);
      params[name] = INTEGER_FIELDS.has(name) ? Math.trunc(value) : value;
    }
    return params;
  }

  function saveSettings() {
    const saved = { modalities: document.querySelector('input[name="modalities"]:checked')?.value || "both" };
    for (const id of Object.values(NUMBER_FIELDS)) saved[id] = $(id).value;
    try { localStorage.setItem(SETTINGS_KEY, JSON.stringify(saved)); } catch (_) { /* private mode */ }
  }

  function loadSettings() {
    let saved = null;
    try { saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "null"); } catch (_) { saved = null; }
    if (!saved) return;
    for (const id of Object.values(NUMBER_FIELDS)) if (typeof saved[id] === "string") $(id).value = saved[id];
    const radio = document.querySelector(`input[name="modalities"][value="${saved.modalities}"]`);
    if (radio) radio.checked = true;
  }

  function setupSettings() {
    loadSettings();
    const key = $("s-api-key");
    try { key.value = sessionStorage.getItem(KEY_STORE) || ""; } catch (_) { /* storage off */ }
    key.addEventListener("change", () => {
      try { sessionStorage.setItem(KEY_STORE, key.value.trim()); } catch (_) { /* storage off */ }
      state.model = null;
      refreshStatus();
    });
    const form = $("settings-form");
    form.addEventListener("input", saveSettings);
    form.addEventListener("change", saveSettings);
    form.addEventListener("submit", (e) => e.preventDefault());
    $("settings-reset").addEventListener("click", () => {
      for (const id of Object.values(NUMBER_FIELDS)) $(id).value = "";
      document.querySelector('input[name="modalities"][value="both"]').checked = true;
      saveSettings();
    });
  }

  // ---------- image viewer ----------

  function openViewer(url, caption, downloadName) {
    const dialog = $("viewer");
    const img = $("viewer-img");
    img.src = url;
    img.alt = caption || "Image";
    img.style.width = "";
    upscale(img, Math.min(512, Math.floor(Math.min(window.innerWidth, window.innerHeight) * 0.7)));
    $("viewer-caption").textContent = caption || "";
    const link = $("viewer-download");
    link.href = url;
    link.download = downloadName || fileName("tokenloom");
    if (typeof dialog.showModal === "function") dialog.showModal();
    else dialog.setAttribute("open", "");
  }

  function setupViewer() {
    const dialog = $("viewer");
    $("viewer-close").addEventListener("click", () => dialog.close());
    dialog.addEventListener("click", (e) => { if (e.target === dialog) dialog.close(); });
  }

  // A clickable, upscaled pixel-art image.
  function pixelImage(url, alt, downloadName, target = DISPLAY_TARGET) {
    const img = el("img", { src: url, alt, class: "pixel", draggable: "false" });
    upscale(img, target);
    img.addEventListener("load", () => scrollChat());  // chat images: keep the newest in view
    const button = el("button", {
      type: "button", class: "image-button", title: "Enlarge",
      "aria-label": `Enlarge: ${alt}`,
      onclick: () => openViewer(img.src, alt, downloadName),
    }, img);
    return { img, button };
  }

  // ---------- attachments (upload, drop, paste) ----------

  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error || new Error("could not read the file"));
      reader.readAsDataURL(file);
    });
  }

  function loadImage(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("not a readable image"));
      img.src = url;
    });
  }

  // Any image the browser can decode -> a PNG data URI (kept as is when it already is a small PNG, or a
  // small GIF / WebP for a model that reads videos: the server reads an animated one as a video).
  async function toPngDataURL(file) {
    const url = await readAsDataURL(file);
    const img = await loadImage(url);
    const side = Math.max(img.naturalWidth, img.naturalHeight);
    if (url.startsWith("data:image/png;") && side <= MAX_UPLOAD_SIDE) return url;
    if (state.seesVideo && /^data:image\/(gif|webp);/.test(url) && side <= MAX_UPLOAD_SIDE) return url;
    const factor = side > MAX_UPLOAD_SIDE ? MAX_UPLOAD_SIDE / side : 1;
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(img.naturalWidth * factor));
    canvas.height = Math.max(1, Math.round(img.naturalHeight * factor));
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = factor < 1;
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    return canvas.toDataURL("image/png");
  }

  // "wav", "flac" or "ogg" for an audio file the server reads (by its name, else its type), or null.
  function audioFormat(file) {
    const ext = ((file.name || "").match(/\.([a-z0-9]+)$/i) || [])[1];
    const byName = { wav: "wav", flac: "flac", ogg: "ogg", oga: "ogg" }[(ext || "").toLowerCase()];
    if (byName) return byName;
    const type = (file.type || "").toLowerCase();
    if (/^audio\/(x-)?(wav|wave|vnd\.wave)$/.test(type)) return "wav";
    if (/^audio\/(x-)?flac$/.test(type)) return "flac";
    if (type === "audio/ogg") return "ogg";
    return null;
  }

  async function addAudio(file, format) {
    const url = await readAsDataURL(file);
    const data = url.slice(url.indexOf(",") + 1);
    if (!data) throw new Error("the file is empty");
    state.attachments.push({ kind: "audio", url, data, format, name: file.name || "audio" });
  }

  async function addFiles(files) {
    const hint = $("composer-hint");
    for (const file of files) {
      const format = audioFormat(file);
      if (format) {
        if (!state.hears) { hint.textContent = "This model cannot hear speech."; continue; }
        try {
          await addAudio(file, format);
          hint.textContent = "";
        } catch (err) {
          hint.textContent = `Could not read ${file.name || "the audio"}: ${err.message}`;
        }
        continue;
      }
      if (!file.type || !file.type.startsWith("image/")) {
        hint.textContent = `${file.name || "That file"} is not an image${state.hears ? " or a WAV, FLAC or OGG file" : ""}.`;
        continue;
      }
      try {
        const url = await toPngDataURL(file);
        state.attachments.push({ kind: "image", url, name: file.name || "pasted image" });
        hint.textContent = "";
      } catch (err) {
        hint.textContent = `Could not read ${file.name || "the image"}: ${err.message}`;
      }
    }
    renderAttachments();
  }

  function renderAttachments() {
    const box = $("attachments");
    box.replaceChildren();
    const counts = { image: 0, audio: 0 };
    state.attachments.forEach((att, i) => {
      const k = ++counts[att.kind];
      const shown = att.kind === "audio"
        ? el("audio", { src: att.url, controls: true, preload: "metadata", "aria-label": `Attached audio ${k}: ${att.name}` })
        : el("img", { src: att.url, alt: `Attached image ${k}: ${att.name}`, class: "pixel thumb" });
      const remove = el("button", {
        type: "button", class: "remove", "aria-label": `Remove attached ${att.kind} ${k}`, title: "Remove",
        onclick: () => { state.attachments.splice(i, 1); renderAttachments(); $("prompt").focus(); },
      }, "×");
      box.append(el("div", { class: `attachment ${att.kind}` }, shown, remove));
    });
    box.hidden = state.attachments.length === 0;
  }

  function setupAttachments() {
    for (const input of [$("file-input"), $("audio-input")]) {
      input.addEventListener("change", async () => {
        await addFiles(Array.from(input.files || []));
        input.value = "";
        $("prompt").focus();
      });
    }
    $("prompt").addEventListener("paste", (e) => {
      const files = Array.from(e.clipboardData?.files || []).filter((f) => f.type.startsWith("image/"));
      if (files.length) { e.preventDefault(); addFiles(files); }
    });
    const panel = $("panel-chat");
    const overlay = $("drop-overlay");
    let depth = 0;
    const hasFiles = (e) => Array.from(e.dataTransfer?.types || []).includes("Files");
    panel.addEventListener("dragenter", (e) => { if (hasFiles(e)) { depth++; overlay.hidden = false; } });
    panel.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) overlay.hidden = true; });
    panel.addEventListener("dragover", (e) => { if (hasFiles(e)) { e.preventDefault(); e.dataTransfer.dropEffect = "copy"; } });
    panel.addEventListener("drop", (e) => {
      if (!hasFiles(e)) return;
      e.preventDefault();
      depth = 0;
      overlay.hidden = true;
      addFiles(Array.from(e.dataTransfer.files));
    });
    renderAttachments();
  }

  // ---------- chat ----------

  // Follow the answer as it grows, unless the reader has scrolled up to read something else.
  let followChat = true;
  function scrollChat(force = false) {
    const box = $("chat-scroll");
    if (force || followChat) {
      box.scrollTop = box.scrollHeight;
      followChat = true;
    }
  }

  function addMessage(role, label) {
    $("empty-hint").hidden = true;
    const body = el("div", { class: "body" });
    const li = el("li", { class: `message ${role}` }, el("div", { class: "role", text: label }), body);
    $("messages").append(li);
    scrollChat(true);
    return { li, body };
  }

  function showUserMessage(text, images, audios = []) {
    const { body } = addMessage("user", "You");
    if (audios.length) {
      const list = el("div", { class: "audios" });
      audios.forEach((att, i) => list.append(el("audio", { src: att.url, controls: true, preload: "metadata",
        "aria-label": `Your audio ${i + 1}: ${att.name}` })));
      body.append(list);
    }
    if (images.length) {
      const row = el("div", { class: "images" });
      images.forEach((att, i) => row.append(pixelImage(att.url, `Your image ${i + 1}`, fileName("upload", i), 128).button));
      body.append(row);
    }
    if (text) body.append(el("p", { class: "text", text }));
  }

  function showError(message) {
    const { li, body } = addMessage("error", "Error");
    li.setAttribute("role", "alert");
    body.append(el("p", { class: "text", text: message }));
  }

  // The assistant's answer as it streams in: text runs and images, with the image being drawn
  // replaced by each newer preview and finally by the finished image.
  class Answer {
    constructor() {
      const { li, body } = addMessage("assistant", "tokenloom");
      this.li = li;
      this.body = body;
      this.parts = [];      // finished parts, for the conversation
      this.textEl = null;   // the text run being appended to
      this.drawing = null;  // {figure, img, caption} of the image being drawn
      this.speech = null;   // {figure, player, caption, chunks, part, done} of the answer's audio
      this.images = 0;
      li.classList.add("streaming");
      li.setAttribute("aria-busy", "true");
      this.status = el("div", { class: "status", text: "thinking…" });
      body.append(this.status);
    }

    get empty() { return this.parts.length === 0 && !this.drawing; }

    appendText(text) {
      if (!text) return;
      if (!this.textEl) {
        this.textEl = el("p", { class: "text" });
        this.body.insertBefore(this.textEl, this.status);
      }
      this.textEl.textContent += text;
      const last = this.parts[this.parts.length - 1];
      if (last && last.type === "text") last.text += text;
      else this.parts.push({ type: "text", text });
      this.status.textContent = "writing…";
      scrollChat();
    }

    putImage(url, partial) {
      if (!url) return;
      if (!this.drawing) {
        this.images += 1;
        const alt = `Generated image ${this.images}`;
        const { img, button } = pixelImage(url, alt, fileName("tokenloom", this.images - 1));
        const caption = el("figcaption", {});
        const figure = el("figure", { class: "generated" }, button, caption);
        this.body.insertBefore(figure, this.status);
        this.drawing = { figure, img, caption, alt };
        this.textEl = null;
        img.addEventListener("load", () => this.reserveSpace(), { once: true });
      } else {
        this.drawing.img.src = url;
      }
      const { figure, img, caption, alt } = this.drawing;
      if (partial) {
        figure.dataset.previews = String(Number(figure.dataset.previews || 0) + 1);
        figure.classList.add("drawing");
        img.alt = `${alt} (drawing…)`;
        caption.textContent = "drawing…";
        this.status.textContent = "drawing…";
      } else {
        figure.classList.remove("drawing");
        figure.style.minHeight = "";
        img.alt = alt;
        caption.textContent = "";
        this.parts.push({ type: "image_url", image_url: { url } });
        this.drawing = null;
        this.status.textContent = "…";
      }
      scrollChat();
    }

    // The answer's speech: every delta.audio's pcm16 data (all its utterances, in order), played back
    // as one WAV once the final audio delta (its expires_at) arrives.
    putAudio(audio) {
      if (!audio) return;
      if (!this.speech) {
        const player = el("audio", { controls: true, preload: "auto", "aria-label": "Spoken answer" });
        const caption = el("figcaption", { text: "speaking…" });
        const figure = el("figure", { class: "speech" }, player, caption);
        this.body.insertBefore(figure, this.status);
        // its place in the conversation, filled in once the audio is complete
        const part = { type: "input_audio", input_audio: { data: "", format: "wav" } };
        this.parts.push(part);
        this.speech = { figure, player, caption, chunks: [], part, done: false };
        this.textEl = null;
        this.status.textContent = "speaking…";
      }
      if (audio.data) this.speech.chunks.push(base64ToBytes(audio.data));
      if (audio.expires_at != null) this.closeAudio("");
      scrollChat();
    }

    // A whole answer's audio at once (a server that did not stream): a WAV, or raw pcm16.
    putWholeAudio(data) {
      this.putAudio({});
      const bytes = base64ToBytes(data);
      if (String.fromCharCode(...bytes.subarray(0, 4)) === "RIFF") this.speech.wav = bytes;
      else this.speech.chunks.push(bytes);
      this.closeAudio("");
    }

    closeAudio(note) {
      const speech = this.speech;
      if (!speech || speech.done) return;
      speech.done = true;
      const length = speech.chunks.reduce((n, c) => n + c.length, 0);
      const pcm = new Uint8Array(length);
      let at = 0;
      for (const c of speech.chunks) { pcm.set(c, at); at += c.length; }
      const wav = speech.wav || wavBytes(pcm);
      speech.player.src = URL.createObjectURL(new Blob([wav], { type: "audio/wav" }));
      speech.caption.textContent = note;
      if (speech.wav || length) speech.part.input_audio.data = bytesToBase64(wav);
      this.status.textContent = "…";
    }

    // Keep the figure's final height while rows fill in, so the page does not jump.
    reserveSpace() {
      if (!this.drawing) return;
      const img = this.drawing.img;
      const w = img.naturalWidth;
      if (!w) return;
      const wanted = Number($("s-height").value) || Number($("s-width").value) || w;
      const factor = Math.max(1, Math.floor(DISPLAY_TARGET / Math.max(w, wanted)));
      this.drawing.figure.style.minHeight = `${wanted * factor + 8}px`;
    }

    finish(note) {
      this.li.classList.remove("streaming");
      this.li.removeAttribute("aria-busy");
      if (this.drawing) {  // an unfinished image (stopped): keep the preview, marked as such
        this.drawing.caption.textContent = "unfinished";
        this.drawing.figure.classList.remove("drawing");
        this.drawing.figure.classList.add("unfinished");
        this.drawing = null;
      }
      if (this.speech && !this.speech.done) this.closeAudio(note ? "unfinished" : "");
      if (note) this.status.textContent = note;
      else this.status.remove();
    }

    // The answer as a conversation message: a string when it is text only, else a list of parts.
    message() {
      const parts = this.parts.filter((p) => p.type !== "input_audio" || p.input_audio.data);
      if (parts.every((p) => p.type === "text")) {
        return { role: "assistant", content: parts.map((p) => p.text).join("") };
      }
      return { role: "assistant", content: parts.map((p) => ({ ...p })) };
    }
  }

  function applyDelta(answer, content) {
    if (content == null) return;
    if (typeof content === "string") { answer.appendText(content); return; }
    const parts = Array.isArray(content) ? content : [content];
    for (const part of parts) {
      if (!part || typeof part !== "object") continue;
      if (part.type === "text") answer.appendText(part.text || "");
      else if (part.type === "image_url") {
        const url = typeof part.image_url === "string" ? part.image_url : part.image_url && part.image_url.url;
        answer.putImage(url, Boolean(part.partial || (part.image_url && part.image_url.partial)));
      }
    }
  }

  // Reads a text/event-stream body and calls onEvent(data) for each event's data; stops at [DONE].
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let match;
      while ((match = /\r?\n\r?\n/.exec(buffer))) {
        const block = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        const data = block.split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data.trim() === "[DONE]") { reader.cancel().catch(() => {}); return true; }
        try { onEvent(data); } catch (err) { reader.cancel().catch(() => {}); throw err; }
      }
    }
    return false;
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("composer").classList.toggle("busy", busy);
  }

  async function send() {
    if (state.controller) return;
    const promptBox = $("prompt");
    const text = promptBox.value.trim();
    const attached = state.attachments.slice();
    const images = attached.filter((att) => att.kind === "image");
    const audios = attached.filter((att) => att.kind === "audio");
    if (!text && !attached.length) { promptBox.focus(); return; }

    let params;
    try { params = samplingParams(); } catch (err) { showError(err.message); return; }

    const content = attached.length
      ? [...images.map((att) => ({ type: "image_url", image_url: { url: att.url } })),
         ...audios.map((att) => ({ type: "input_audio", input_audio: { data: att.data, format: att.format } })),
         ...(text ? [{ type: "text", text }] : [])]
      : text;
    const userTurn = { role: "user", content };
    state.conversation.push(userTurn);
    showUserMessage(text, images, audios);
    promptBox.value = "";
    state.attachments = [];
    renderAttachments();

    const answerWith = modalities();
    const body = { messages: state.conversation, stream: true, modalities: answerWith, ...params };
    if (answerWith.includes("audio")) body.audio = { format: "pcm16" };  // 24 kHz mono, as the server streams it
    if (state.model) body.model = state.model;

    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    $("composer-hint").textContent = "";
    const answer = new Answer();
    let finishReason = null;
    let failure = null;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: apiHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      const type = response.headers.get("content-type") || "";
      if (type.includes("application/json")) {  // a server that answered without streaming
        const whole = await response.json();
        if (whole.error) throw new Error(whole.error.message || "error");
        const choice = whole.choices && whole.choices[0];
        applyDelta(answer, choice && choice.message && choice.message.content);
        if (choice && choice.message && choice.message.audio && choice.message.audio.data) {
          answer.putWholeAudio(choice.message.audio.data);
        }
        finishReason = choice && choice.finish_reason;
      } else {
        await readEvents(response, (data) => {
          let chunk;
          try { chunk = JSON.parse(data); } catch (_) { return; }
          if (chunk.error) throw new Error(chunk.error.message || "error");
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) return;
          applyDelta(answer, choice.delta && choice.delta.content);
          if (choice.delta && choice.delta.audio) answer.putAudio(choice.delta.audio);
          if (choice.finish_reason) finishReason = choice.finish_reason;
        });
      }
    } catch (err) {
      failure = err;
    } finally {
      state.controller = null;
      setBusy(false);
    }

    const aborted = failure && (failure.name === "AbortError" || controller.signal.aborted);
    if (failure && !aborted) {
      answer.finish();
      if (answer.empty) {
        answer.li.remove();
        // Nothing came back: take the turn out of the conversation and give the text back to retry.
        state.conversation.pop();
        if (!promptBox.value) promptBox.value = text;
        if (!state.attachments.length) { state.attachments = attached; renderAttachments(); }
      } else {
        state.conversation.push(answer.message());
      }
      const message = failure instanceof TypeError
        ? `Could not reach the server (${failure.message}).` : failure.message;
      showError(message);
    } else {
      const note = aborted ? "stopped" : finishReason === "length" ? "stopped at the token limit" : null;
      if (answer.empty && !aborted) answer.appendText("(no answer)");
      answer.finish(note);
      if (!answer.empty) state.conversation.push(answer.message());
      else if (aborted) state.conversation.pop();
    }
    scrollChat();
    promptBox.focus();
  }

  function newChat() {
    if (state.controller) state.controller.abort();
    state.conversation = [];
    state.attachments = [];
    renderAttachments();
    $("messages").replaceChildren();
    $("empty-hint").hidden = false;
    $("composer-hint").textContent = "";
    $("prompt").value = "";
    $("prompt").focus();
  }

  function setupChat() {
    const box = $("chat-scroll");
    box.addEventListener("scroll", () => {
      followChat = box.scrollHeight - box.scrollTop - box.clientHeight < 48;
    }, { passive: true });
    $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
    });
    $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
    $("new-chat").addEventListener("click", newChat);
  }

  // ---------- gallery ----------

  async function generateGallery() {
    const form = $("gallery-form");
    if (!form.reportValidity()) return;
    const prompt = $("g-prompt").value.trim();
    if (!prompt) return;
    const n = Math.min(8, Math.max(1, Math.trunc(Number($("g-n").value) || 1)));
    const size = $("g-size").value;
    const seedText = $("g-seed").value.trim();
    const request = { prompt, n, size, response_format: "b64_json" };
    if (seedText !== "") request.seed = Math.trunc(Number(seedText));
    const guidance = $("s-guidance").value.trim();
    if (guidance !== "") request.guidance_scale = Number(guidance);
    if (state.model) request.model = state.model;

    state.runs += 1;
    const run = state.runs;
    const details = `${size}, ${n} candidate${n > 1 ? "s" : ""}` +
      (request.seed != null ? `, seed ${request.seed}` : "") +
      (request.guidance_scale != null ? `, guidance ${request.guidance_scale}` : "");
    const grid = el("div", { class: "grid", role: "list", "aria-label": `Candidates for ${prompt}` });
    const status = el("p", { class: "run-status", text: "drawing…" });
    const section = el("section", { class: "run", "aria-busy": "true" },
      el("h3", {}, el("span", { class: "run-prompt", text: prompt }), el("span", { class: "run-details", text: details })),
      status, grid);
    const [w] = size.split("x").map(Number);
    const factor = Math.max(1, Math.floor(160 / (w || 64)));
    for (let i = 0; i < n; i++) {
      grid.append(el("div", { class: "tile placeholder", role: "listitem", style: `width:${w * factor}px;height:${w * factor}px` }));
    }
    $("gallery-runs").prepend(section);

    const button = $("g-generate");
    button.disabled = true;
    const started = performance.now();
    try {
      // Requests of at most GALLERY_BATCH images each, sent together; with a seed, batch k uses
      // seed + k * GALLERY_SEED_STRIDE so that the same seed gives the same candidates again.
      const batches = [];
      for (let start = 0; start < n; start += GALLERY_BATCH) {
        const part = { ...request, n: Math.min(GALLERY_BATCH, n - start) };
        if (request.seed != null) part.seed = request.seed + (start / GALLERY_BATCH) * GALLERY_SEED_STRIDE;
        batches.push(part);
      }
      const answers = await Promise.all(batches.map(async (part) => {
        const response = await fetch("/v1/images/generations", {
          method: "POST",
          headers: apiHeaders({ "Content-Type": "application/json" }),
          body: JSON.stringify(part),
        });
        if (!response.ok) throw new Error(await errorMessage(response));
        const body = await response.json();
        return (body && body.data) || [];
      }));
      const items = answers.flat();
      grid.replaceChildren();
      items.forEach((item, i) => {
        const url = item.b64_json ? `data:image/png;base64,${item.b64_json}` : item.url;
        if (!url) return;
        const alt = `Candidate ${i + 1} of ${items.length} for “${prompt}”`;
        const name = `tokenloom-gallery-${run}-${i + 1}.png`;
        const img = el("img", { src: url, alt, class: "pixel", draggable: "false" });
        upscale(img, 160);
        const open = el("button", {
          type: "button", class: "image-button", "aria-label": `Enlarge candidate ${i + 1}`, title: "Enlarge",
          onclick: () => openViewer(url, alt, name),
        }, img);
        const download = el("a", { href: url, download: name, class: "download", "aria-label": `Download candidate ${i + 1}` }, "Download");
        grid.append(el("figure", { class: "tile", role: "listitem" }, open, el("figcaption", {}, `#${i + 1} `, download)));
      });
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      status.textContent = `${items.length} image${items.length === 1 ? "" : "s"} in ${seconds} s`;
    } catch (err) {
      grid.replaceChildren();
      status.textContent = err instanceof TypeError ? `Could not reach the server (${err.message}).` : err.message;
      status.classList.add("error");
      status.setAttribute("role", "alert");
    } finally {
      section.removeAttribute("aria-busy");
      button.disabled = false;
    }
  }

  function setupGallery() {
    $("gallery-form").addEventListener("submit", (e) => { e.preventDefault(); generateGallery(); });
  }

  // ---------- start ----------

  function start() {
    setupTabs();
    setupSettings();
    setupViewer();
    setupAttachments();
    setupChat();
    setupGallery();
    refreshStatus();
    setInterval(refreshStatus, 15000);
    $("prompt").focus();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
