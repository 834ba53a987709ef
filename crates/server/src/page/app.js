// The kibitz page: the delayed picture, the commentary as it streams in, and the controls.
// Plain browser JavaScript, no build step. The picture is already as late as the
// commentary needs (the server shows frames `target_delay` behind), so tokens are shown
// the moment they arrive.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_LIMIT = 60;

// Exposed for curious users and for the browser test.
const kibitz = {
  cycle: null,
  text: "",
  comments: 0,
  events: 0,
  pictureChanges: 0,
  lastSample: null,
  retryAt: null,
  sourceState: "connecting",
  sourceDetail: null,
};
window.kibitz = kibitz;

function clock(seconds) {
  if (typeof seconds !== "number" || !isFinite(seconds)) return "";
  const m = Math.floor(seconds / 60);
  const s = (seconds - m * 60).toFixed(1).padStart(4, "0");
  return `${m}:${s}`;
}

function secs(value) {
  return typeof value === "number" && isFinite(value) ? `${value.toFixed(1)} s` : "–";
}

// ---- the picture -------------------------------------------------------------------

const picture = $("picture");
let pictureRetry = null;

function startPicture() {
  clearTimeout(pictureRetry);
  picture.src = `/api/mjpeg?since=${Date.now()}`;
}

picture.addEventListener("load", () => { $("waiting").hidden = true; });
picture.addEventListener("error", () => {
  $("waiting").hidden = false;
  $("waiting").textContent = "picture lost, reconnecting…";
  pictureRetry = setTimeout(startPicture, 2000);
});

// A tiny copy of the picture, sampled a few times a second, tells whether it moves.
const sampler = document.createElement("canvas");
sampler.width = 16;
sampler.height = 9;
const sampleContext = sampler.getContext("2d", { willReadFrequently: true });

setInterval(() => {
  if (!picture.naturalWidth) return;
  try {
    sampleContext.drawImage(picture, 0, 0, sampler.width, sampler.height);
    const data = sampleContext.getImageData(0, 0, sampler.width, sampler.height).data;
    let hash = 0;
    for (let i = 0; i < data.length; i += 4) {
      hash = (Math.imul(hash, 31) + data[i] + 3 * data[i + 1] + 7 * data[i + 2]) >>> 0;
    }
    if (kibitz.lastSample !== null && hash !== kibitz.lastSample) kibitz.pictureChanges += 1;
    kibitz.lastSample = hash;
    $("waiting").hidden = true;
  } catch (_) {
    // A frame that is still decoding cannot be drawn; the next sample will do.
  }
}, 250);

// ---- commentary --------------------------------------------------------------------

function renderCurrent(active) {
  const current = $("current");
  current.querySelector(".text").textContent = kibitz.text;
  current.dataset.active = active ? "true" : "false";
}

function addHistory(text, frames, latency, kind) {
  const item = document.createElement("li");
  if (kind) item.className = kind;
  const when = document.createElement("span");
  when.className = "when";
  const parts = [];
  if (frames && frames.length) {
    const first = clock(frames[0]);
    const last = clock(frames[frames.length - 1]);
    parts.push(first === last ? first : `${first}–${last}`);
  }
  if (typeof latency === "number") parts.push(`${latency.toFixed(1)} s`);
  when.textContent = parts.join(" · ");
  item.append(when, document.createTextNode(text));
  const history = $("history");
  history.prepend(item);
  while (history.children.length > HISTORY_LIMIT) history.lastElementChild.remove();
  $("empty").hidden = true;
}

const handlers = {
  cycle_start(e) {
    kibitz.cycle = e.cycle;
    kibitz.text = "";
    renderCurrent(true);
  },
  token(e) {
    if (e.cycle !== kibitz.cycle) {
      kibitz.cycle = e.cycle;
      kibitz.text = "";
    }
    kibitz.text += e.text;
    renderCurrent(true);
  },
  cycle_end(e) {
    // The full text is authoritative: it repairs tokens lost to a reconnect or lag.
    kibitz.text = "";
    kibitz.cycle = null;
    renderCurrent(false);
    if (!e.skipped && e.text) {
      kibitz.comments += 1;
      addHistory(e.text, e.frames, e.latency);
    }
    $("latency").textContent = secs(e.latency);
    $("delay").textContent = secs(e.target_delay);
  },
  error(e) {
    addHistory(e.message, null, null, "error");
    if (e.cycle === kibitz.cycle) {
      kibitz.text = "";
      renderCurrent(false);
    }
  },
  source(e) {
    showSource(e.state, e.detail, null);
  },
  lagged() {},
};

function showSource(state, detail, retryIn) {
  kibitz.sourceState = state || "unknown";
  kibitz.sourceDetail = detail || null;
  kibitz.retryAt = typeof retryIn === "number" ? Date.now() + retryIn * 1000 : null;
  renderSource();
}

function renderSource() {
  const pill = $("source");
  pill.dataset.state = kibitz.sourceState;
  let label = kibitz.sourceState;
  if (kibitz.retryAt !== null) {
    const left = Math.max(0, Math.ceil((kibitz.retryAt - Date.now()) / 1000));
    label += ` · retry in ${left} s`;
  }
  pill.textContent = label;
  pill.title = kibitz.sourceDetail || "video source";
}
setInterval(() => { if (kibitz.retryAt !== null) renderSource(); }, 1000);

// ---- the event stream, reconnecting by itself ----------------------------------------

let stream = null;
let streamBackoff = 1000;
let streamWasUp = false;

function connect() {
  stream = new EventSource("/api/stream");
  stream.onopen = () => {
    $("link").dataset.up = "true";
    streamBackoff = 1000;
    // After an outage the picture connection is likely gone as well.
    if (streamWasUp) startPicture();
    streamWasUp = true;
    refreshStatus();
  };
  stream.onerror = () => {
    $("link").dataset.up = "false";
    // The browser retries network errors itself; a refused stream (CLOSED) is ours to retry.
    if (stream.readyState === EventSource.CLOSED) {
      stream.close();
      setTimeout(connect, streamBackoff);
      streamBackoff = Math.min(streamBackoff * 2, 15000);
    }
  };
  for (const [type, handle] of Object.entries(handlers)) {
    stream.addEventListener(type, (message) => {
      kibitz.events += 1;
      try {
        handle(JSON.parse(message.data));
      } catch (err) {
        console.warn("kibitz: bad event", type, err);
      }
    });
  }
}

// ---- status --------------------------------------------------------------------------

async function refreshStatus() {
  try {
    const response = await fetch("/api/status", { cache: "no-store" });
    if (!response.ok) return;
    const status = await response.json();
    const source = status.source || {};
    showSource(source.state, source.detail, source.retry_in);
    $("fps").textContent = typeof source.fps === "number" ? source.fps.toFixed(source.fps % 1 ? 2 : 0) : "–";
    $("delay").textContent = secs(status.target_delay);
    const tally = status.commentary || {};
    $("cycles").textContent = (tally.cycles || 0) - (tally.skipped || 0);
    $("skipped").textContent = tally.skipped || 0;
    if (typeof tally.last_latency === "number") $("latency").textContent = secs(tally.last_latency);
    const engine = status.engine || {};
    $("engine").textContent = [engine.kind, engine.model, engine.backend].filter(Boolean).join(" · ")
      + (engine.healthy === false ? " · down" : "");
  } catch (_) {
    // The server is restarting; the next poll will tell.
  }
}

// ---- controls ------------------------------------------------------------------------

function say(text, isError) {
  const message = $("message");
  message.textContent = text;
  message.className = isError ? "error" : "";
}

async function change(body) {
  $("apply").disabled = true;
  try {
    const response = await fetch("/api/instruction", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      say(answer.error || `the server said ${response.status}`, true);
      return false;
    }
    $("profile").value = answer.profile;
    say(answer.instruction
      ? `profile ${answer.profile}, instruction set`
      : `profile ${answer.profile}`, false);
    return true;
  } catch (_) {
    say("cannot reach the server", true);
    return false;
  } finally {
    $("apply").disabled = false;
  }
}

async function loadProfiles() {
  try {
    const response = await fetch("/api/profiles", { cache: "no-store" });
    const answer = await response.json();
    const select = $("profile");
    select.replaceChildren(...answer.profiles.map((name) => new Option(name, name)));
    select.value = answer.current.profile;
    select.dataset.current = answer.current.profile;
    $("instruction").value = answer.current.instruction || "";
  } catch (_) {
    setTimeout(loadProfiles, 2000);
  }
}

$("profile").addEventListener("change", async (event) => {
  const select = event.target;
  if (!(await change({ profile: select.value }))) select.value = select.dataset.current || select.value;
  else select.dataset.current = select.value;
});

$("controls").addEventListener("submit", (event) => {
  event.preventDefault();
  change({ instruction: $("instruction").value });
});

// ---- start ---------------------------------------------------------------------------

startPicture();
loadProfiles();
connect();
refreshStatus();
setInterval(refreshStatus, 2000);
