// The kibitz page. Plain browser JavaScript, no build step; one file for both views:
//
// - `/`: every stream as a tile (a thumbnail polled a few times a second, its state, its
//   latest comment), a form to add one, each tile's profile and a remove button. All
//   streams' events come over ONE `EventSource("/api/events")`, so a page with many
//   streams holds one event connection, and thumbnails fetch `/frame` (one small JPEG)
//   rather than holding an MJPEG stream each.
// - `/streams/{id}`: one stream: its delayed MJPEG picture, its commentary as it streams
//   in, the profile picker and instruction box. The picture is already as late as the
//   commentary needs (the server shows frames `target_delay` behind), so tokens are shown
//   the moment they arrive. With sound on (one click: browsers allow audio only after
//   one), the event stream is reopened with `?sound=on`, which makes the page a listener
//   (the server speaks only while someone listens), and each `speech` event's WAV clip is
//   played with Web Audio at its `play_at`: server time, turned into this page's time by
//   the offset to the server's clock (`/api/clock`, NTP-style), then into the
//   AudioContext's time. That is when the picture shows what the clip talks about.
//
// Both views also have: a search box over everything said (`/api/history?q=`, debounced,
// newest first, "more" pages back with its `next` cursor), and alerts: a stream's rules
// (`/api/streams/{id}/alerts`) are listed and edited in its view, and a fired `alert` event
// is highlighted there (and flashes the picture's border) and on its overview tile, with
// its clip. The stream view shows its last entries from the history at once when opened,
// and has a question box: `POST /ask`, whose answer streams into the same list as the
// comments (from the response body and from the `answer_*` events, which also bring the
// answers to other viewers' questions).
//
// The token: browsers cannot put headers on <img>, EventSource or WebSocket. When the
// server answers 401 the page asks for the token, sends it once as `Authorization:
// Bearer` to `POST /api/session`, which sets an HttpOnly, SameSite=Strict cookie that
// every later request carries, and forgets it. It never goes into a URL, storage or the
// page.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_LIMIT = 60;
/// Thumbnails: the pause after one picture has loaded before asking for the next.
const THUMB_EVERY_MS = 400;
/// Thumbnails: the pause after a failed fetch (no frame yet, server away).
const THUMB_RETRY_MS = 1500;
const LIST_REFRESH_MS = 5000;
const STATUS_REFRESH_MS = 2000;
/// The clock offset to the server is measured again this often.
const CLOCK_REFRESH_MS = 60000;
/// Round trips per clock measurement; the quickest one counts.
const CLOCK_SAMPLES = 5;
/// A clip this late (ms) still starts from its beginning; later ones start part way in.
const LATE_OK_MS = 150;
/// Clip records kept in `kibitz.speech`.
const SPEECH_KEPT = 50;
/// History entries shown at once when a stream's view opens.
const RECENT_ENTRIES = 20;
/// Search: the pause after the last key before asking, and results a page.
const SEARCH_DEBOUNCE_MS = 300;
const SEARCH_PAGE = 20;
/// How long a fired alert flashes the picture's border.
const ALERT_FLASH_MS = 6000;
/// The overview highlights alerts fired this recently when it opens (from `/api/alerts`).
const ALERT_RECENT_MS = 15 * 60 * 1000;
/// An alert clip's pictures a second when played here, for a clip whose pictures carry no
/// capture time (the server stamps each one; see `clipTime`).
const CLIP_FPS = 10;

// Exposed for curious users and for the browser test.
const kibitz = {
  view: null,
  stream: null,
  events: 0,
  // The single-stream view.
  cycle: null,
  text: "",
  tokens: 0,
  comments: 0,
  pictureChanges: 0,
  lastSample: null,
  retryAt: null,
  sourceState: "connecting",
  sourceDetail: null,
  gone: false,
  // Sound: whether it is on, the server's clock minus this page's (ms) and the round trip
  // it was measured with, and per `speech` event {cycle, playAt (server ms), scheduledAt
  // (local ms the clip starts, or its start would have been had it started part way
  // in), offset (s into the clip it started at), started, ended, skipped, late (ms)}.
  sound: false,
  clockOffset: null,
  clockRtt: null,
  speech: [],
  // `speech` events that came while sound was off (another page listens).
  speechIgnored: 0,
  voice: null,
  // Questions: per answer id {question, text, done, error, mine}; `asked`: sent from here.
  answers: {},
  asked: 0,
  // Fired alerts seen (events, and on the overview `/api/alerts`), newest last; the
  // stream's rules as last listed.
  alerts: [],
  rules: [],
  // The history: whether the server keeps one (null until known), entries shown at once
  // when the view opened, and the search {query, shown, next, busy}.
  historyOn: null,
  earlier: 0,
  search: { query: "", shown: 0, next: null, busy: false },
  // The overview: per stream id, {state, comment, profile, loads, fresh, changes}: pictures
  // shown, of them new frames (by the server's `x-frame-seq`), of them different-looking.
  tiles: {},
  maxStreams: null,
  session: null,
};
window.kibitz = kibitz;

// ---- words ------------------------------------------------------------------------

function clock(seconds) {
  if (typeof seconds !== "number" || !isFinite(seconds)) return "";
  const m = Math.floor(seconds / 60);
  const s = (seconds - m * 60).toFixed(1).padStart(4, "0");
  return `${m}:${s}`;
}

/// A wall-clock time (unix ms) as a person reads it: the time of day, with the date when
/// it is not today.
function stamp(ms) {
  if (typeof ms !== "number" || !isFinite(ms)) return "";
  const date = new Date(ms);
  const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return date.toDateString() === new Date().toDateString()
    ? time : `${date.toLocaleDateString([], { month: "short", day: "numeric" })} ${time}`;
}

function secs(value) {
  return typeof value === "number" && isFinite(value) ? `${value.toFixed(1)} s` : "–";
}

/// Shows `text` in a `.message` element; red when `isError`.
function say(element, text, isError) {
  element.textContent = text;
  element.classList.toggle("error", Boolean(isError));
}

function problem(answer) {
  return answer.data.error || (answer.status ? `the server said ${answer.status}` : "cannot reach the server");
}

function streamPath(id) {
  return `/api/streams/${encodeURIComponent(id)}`;
}

// ---- talking to the server, signing in when it asks --------------------------------

/// `{ok, status, data}` for one JSON call. A 401 asks for the token (see `signIn`) and
/// retries once; `ask: false` (background refreshes) only asks if the person has not
/// already said no. Never throws: a network failure is status 0.
async function api(method, path, body, { ask = true } = {}) {
  const init = { method, cache: "no-store", headers: {} };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  try {
    let response = await fetch(path, init);
    if (response.status === 401 && (await signIn({ ask }))) response = await fetch(path, init);
    const data = response.status === 204 ? {} : await response.json().catch(() => ({}));
    return { ok: response.ok, status: response.status, data };
  } catch (_) {
    return { ok: false, status: 0, data: {} };
  }
}

let signingIn = null;
let declined = false;

/// Resolves true once a session cookie is set. Callers waiting at the same time share one
/// dialog.
function signIn({ ask = true } = {}) {
  if (!ask && declined) return Promise.resolve(false);
  if (!signingIn) {
    signingIn = askForToken().finally(() => { signingIn = null; });
  }
  return signingIn;
}

function askForToken() {
  const dialog = $("signin");
  const form = $("signin-form");
  const input = $("signin-token");
  const message = $("signin-message");
  return new Promise((resolve) => {
    const finish = (ok) => {
      input.value = "";
      form.onsubmit = null;
      $("signin-cancel").onclick = null;
      dialog.oncancel = null;
      if (dialog.open) dialog.close();
      declined = !ok;
      resolve(ok);
    };
    form.onsubmit = async (event) => {
      event.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      $("signin-submit").disabled = true;
      try {
        const response = await fetch("/api/session", {
          method: "POST",
          cache: "no-store",
          headers: { authorization: `Bearer ${token}` },
        });
        if (response.ok) {
          showSession(await response.json().catch(() => null));
          finish(true);
        } else if (response.status === 401) {
          say(message, "That is not the server's token.", true);
          input.select();
        } else {
          say(message, `the server said ${response.status}`, true);
        }
      } catch (err) {
        // fetch refuses a header with characters outside Latin-1 before sending anything.
        say(message, err instanceof TypeError && /header/i.test(err.message)
          ? "A token has no such characters." : "Cannot reach the server.", true);
      } finally {
        $("signin-submit").disabled = false;
      }
    };
    $("signin-cancel").onclick = () => finish(false);
    dialog.oncancel = (event) => {
      event.preventDefault();
      finish(false);
    };
    say(message, "", false);
    input.value = "";
    dialog.showModal();
    input.focus();
  });
}

function showSession(session) {
  if (!session) return;
  kibitz.session = session;
  const button = $("session");
  button.hidden = !session.token_required;
  button.textContent = session.authenticated ? "sign out" : "sign in";
}

async function loadSession() {
  const answer = await api("GET", "/api/session", undefined, { ask: false });
  if (!answer.ok) return;
  showSession(answer.data);
  if (answer.data.viewing_requires_token && !answer.data.authenticated) {
    // Nothing can be shown without it; ask before opening any connection.
    await signIn();
  }
}

$("session").addEventListener("click", async () => {
  if (kibitz.session && kibitz.session.authenticated) {
    const answer = await api("DELETE", "/api/session", undefined, { ask: false });
    showSession(answer.data);
    if (kibitz.session && kibitz.session.viewing_requires_token) location.reload();
  } else if (await signIn()) {
    // Connections refused before signing in are easiest to open afresh.
    if (kibitz.session.viewing_requires_token) location.reload();
  }
});

// ---- profiles, shared by both views ----------------------------------------------------

let profileNames = [];
/// The voices a stream may be given (`off` first), from `/api/profiles`.
let voiceNames = [];

async function loadProfiles() {
  const answer = await api("GET", "/api/profiles", undefined, { ask: false });
  if (!answer.ok) {
    setTimeout(loadProfiles, 2000);
    return;
  }
  profileNames = answer.data.profiles || [];
  const limit = answer.data.max_instruction_chars;
  if (typeof limit === "number") {
    for (const id of ["instruction", "add-instruction"]) $(id).maxLength = limit;
  }
  voiceNames = answer.data.voices || [];
  fillVoices();
  fillProfiles($("profile"), null);
  fillProfiles($("add-profile"), "server default");
  for (const tile of tiles.values()) fillProfiles(tile.select, null);
}

/// Puts the profile names into `select`, first an empty choice labelled `blank` if given,
/// keeping the choice (`data-current`, which holds it even before there are options).
function fillProfiles(select, blank) {
  const chosen = select.dataset.current || select.value;
  const options = profileNames.map((name) => new Option(name, name));
  if (blank) options.unshift(new Option(blank, ""));
  select.replaceChildren(...options);
  if (chosen) select.value = chosen;
}

/// A remove button that asks once more before it acts.
function armedButton(button, action) {
  const label = button.textContent;
  let timer = null;
  const disarm = () => {
    clearTimeout(timer);
    button.dataset.armed = "false";
    button.textContent = label;
  };
  button.addEventListener("click", async (event) => {
    event.preventDefault();
    if (button.dataset.armed !== "true") {
      button.dataset.armed = "true";
      button.textContent = "really remove?";
      timer = setTimeout(disarm, 4000);
      return;
    }
    disarm();
    button.disabled = true;
    try {
      await action();
    } finally {
      button.disabled = false;
    }
  });
}

// ---- pictures ---------------------------------------------------------------------------

// A tiny copy of a picture tells whether it moved since the last look.
const sampler = document.createElement("canvas");
sampler.width = 16;
sampler.height = 9;
const sampleContext = sampler.getContext("2d", { willReadFrequently: true });

/// A hash of `img`'s pixels, or null while it cannot be drawn.
function sample(img) {
  if (!img.naturalWidth) return null;
  try {
    sampleContext.drawImage(img, 0, 0, sampler.width, sampler.height);
    const data = sampleContext.getImageData(0, 0, sampler.width, sampler.height).data;
    let hash = 0;
    for (let i = 0; i < data.length; i += 4) {
      hash = (Math.imul(hash, 31) + data[i] + 3 * data[i + 1] + 7 * data[i + 2]) >>> 0;
    }
    return hash;
  } catch (_) {
    // A frame that is still decoding cannot be drawn; the next sample will do.
    return null;
  }
}

// ---- the event stream, reconnecting by itself -----------------------------------------

/// Opens `url()` as an EventSource, calls `handlers[type]` with each event's JSON and
/// `opened(again)` on every (re)connect. The browser retries network errors itself; a
/// refused stream (CLOSED) is retried here with backoff. Returns `{reopen}`: closes the
/// connection and opens `url()` afresh (sound on or off), which counts as a first open.
function listen(url, handlers, opened) {
  let backoff = 1000;
  let wasUp = false;
  let current = null;
  let retry = null;
  const connect = () => {
    const source = new EventSource(url());
    current = source;
    source.onopen = () => {
      if (source !== current) return;
      $("link").dataset.up = "true";
      backoff = 1000;
      opened(wasUp);
      wasUp = true;
    };
    source.onerror = () => {
      if (source !== current) return;
      $("link").dataset.up = "false";
      if (source.readyState === EventSource.CLOSED) {
        source.close();
        retry = setTimeout(connect, backoff);
        backoff = Math.min(backoff * 2, 15000);
      }
    };
    for (const [type, handle] of Object.entries(handlers)) {
      source.addEventListener(type, (message) => {
        // The connection's own "error" is not an event from the server.
        if (typeof message.data !== "string" || source !== current) return;
        kibitz.events += 1;
        try {
          handle(JSON.parse(message.data));
        } catch (err) {
          console.warn("kibitz: bad event", type, err);
        }
      });
    }
  };
  connect();
  return {
    reopen() {
      clearTimeout(retry);
      current.close();
      backoff = 1000;
      wasUp = false;
      connect();
    },
  };
}

// ==== the overview: `/` ===================================================================

/// id → the tile's elements and state.
const tiles = new Map();

function startOverview() {
  kibitz.view = "overview";
  $("overview").hidden = false;
  listen(() => "/api/events", overviewEvents, () => refreshList());
  refreshList();
  loadRecentAlerts();
  setInterval(refreshList, LIST_REFRESH_MS);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) for (const tile of tiles.values()) pollThumb(tile);
  });
  $("add").addEventListener("submit", addStream);
  for (const input of $("add").querySelectorAll("input, select")) {
    input.addEventListener("input", () => input.removeAttribute("aria-invalid"));
  }
}

const overviewEvents = {
  stream_added(e) { showTile(e.summary); countTiles(); },
  stream_changed(e) { showTile(e.summary); },
  stream_removed(e) { dropTile(e.stream); countTiles(); },
  source(e) {
    const tile = tiles.get(e.stream);
    if (tile) showTile({ ...tile.summary, state: e.state, detail: e.detail });
  },
  cycle_start(e) {
    const tile = tiles.get(e.stream);
    if (!tile) return;
    tile.active = true;
    tile.text = "";
    showComment(tile);
  },
  token(e) {
    const tile = tiles.get(e.stream);
    if (!tile) return;
    tile.active = true;
    tile.text += e.text;
    showComment(tile);
  },
  cycle_end(e) {
    const tile = tiles.get(e.stream);
    if (!tile) return;
    tile.active = false;
    tile.text = "";
    if (!e.skipped && e.text) tile.summary.last_comment = e.text;
    showComment(tile);
  },
  error(e) {
    const tile = tiles.get(e.stream);
    if (!tile) return;
    tile.active = false;
    tile.text = "";
    showComment(tile);
    say(tile.message, e.message, true);
  },
  alert(e) {
    noteAlert(e);
    showTileAlert(e, true);
  },
  // Events were lost: the list is the truth.
  lagged() { refreshList(); },
};

async function refreshList() {
  const answer = await api("GET", "/api/streams", undefined, { ask: false });
  if (!answer.ok) return;
  const listed = new Set();
  for (const summary of answer.data.streams || []) {
    listed.add(summary.id);
    showTile(summary);
  }
  for (const id of [...tiles.keys()]) if (!listed.has(id)) dropTile(id);
  kibitz.maxStreams = answer.data.max_streams ?? null;
  countTiles();
}

function countTiles() {
  const n = tiles.size;
  const max = kibitz.maxStreams;
  $("title").textContent = `${n} ${n === 1 ? "stream" : "streams"}` + (max ? ` of ${max}` : "");
  $("overview-empty").hidden = n > 0;
  const full = max !== null && n >= max;
  $("add-submit").disabled = full;
  $("add-submit").title = full ? `the server runs at most ${max} streams; remove one first` : "";
}

/// Creates or updates the tile for `summary`.
function showTile(summary) {
  let tile = tiles.get(summary.id);
  if (!tile) {
    tile = makeTile(summary.id);
    tiles.set(summary.id, tile);
    $("tiles").append(tile.li);
    pollThumb(tile);
  }
  tile.summary = { ...tile.summary, ...summary };
  const s = tile.summary;
  tile.li.dataset.state = s.state;
  tile.pill.dataset.state = s.state;
  tile.pill.textContent = s.state;
  tile.pill.title = s.detail || "video source";
  tile.source.textContent = s.source;
  tile.source.title = s.source;
  // Servers that list each stream's voice: a speaker on the tiles that speak.
  const voice = typeof s.voice === "string" ? s.voice : (s.settings && s.settings.voice);
  tile.voiced.hidden = !voice || voice.startsWith("off");
  tile.voiced.title = voice ? `speaks with ${voice}` : "";
  tile.instruction.textContent = s.instruction ? `“${s.instruction}”` : "";
  tile.instruction.hidden = !s.instruction;
  tile.select.dataset.current = s.profile;
  if (document.activeElement !== tile.select && !tile.changing) tile.select.value = s.profile;
  if (s.state === "failed" || s.state === "ended") say(tile.message, s.detail || s.state, true);
  else if (tile.message.classList.contains("error") && s.state === "live") say(tile.message, "", false);
  Object.assign(kibitz.tiles[s.id], { state: s.state, profile: s.profile, comment: s.last_comment || null });
  showComment(tile);
  if (tileAlerts.has(s.id) && !tile.alertShown) showTileAlert(tileAlerts.get(s.id), false);
}

function makeTile(id) {
  const li = document.createElement("li");
  li.className = "tile";
  li.dataset.id = id;
  li.innerHTML = `
    <a class="open" title="open this stream">
      <div class="thumb">
        <img alt="">
        <span class="overlay">waiting for a picture…</span>
        <span class="pill"></span>
      </div>
      <div class="name"><strong></strong><span class="voiced" hidden>🔊</span><span class="muted source"></span></div>
    </a>
    <p class="comment" data-active="false"></p>
    <p class="instruction muted" hidden></p>
    <div class="alert-note" role="alert" hidden>
      <span class="alert-text"></span>
      <a class="clip" title="the seconds of picture around it (Motion JPEG)">clip</a>
      <button type="button" class="dismiss quiet" title="dismiss">×</button>
    </div>
    <div class="tile-controls">
      <select class="profile" aria-label="profile"></select>
      <button type="button" class="remove danger" title="stop this stream and remove it">remove</button>
    </div>
    <p class="message" role="status"></p>`;
  const tile = {
    id,
    li,
    img: li.querySelector("img"),
    overlay: li.querySelector(".overlay"),
    pill: li.querySelector(".pill"),
    source: li.querySelector(".source"),
    voiced: li.querySelector(".voiced"),
    comment: li.querySelector(".comment"),
    instruction: li.querySelector(".instruction"),
    select: li.querySelector(".profile"),
    remove: li.querySelector(".remove"),
    message: li.querySelector(".message"),
    alertNote: li.querySelector(".alert-note"),
    alertShown: null,
    summary: { id },
    active: false,
    text: "",
    gone: false,
    polling: false,
    timer: null,
    url: null,
    lastSample: null,
    seq: null,
    changing: false,
  };
  li.querySelector(".open").href = `/streams/${encodeURIComponent(id)}`;
  li.querySelector("strong").textContent = id;
  tile.img.alt = `${id}: the newest picture`;
  fillProfiles(tile.select, null);
  tile.select.addEventListener("change", () => changeTileProfile(tile));
  armedButton(tile.remove, () => removeTile(tile));
  tile.alertNote.querySelector(".clip").addEventListener("click", (event) => {
    event.preventDefault();
    playClip(event.currentTarget.href);
  });
  tile.alertNote.querySelector(".dismiss").addEventListener("click", () => {
    li.dataset.alert = "false";
    tile.alertNote.hidden = true;
    kibitz.tiles[id].alert = null;
  });
  kibitz.tiles[id] = { state: null, comment: null, profile: null, loads: 0, fresh: 0, changes: 0, alert: null, alerts: 0 };
  return tile;
}

function dropTile(id) {
  const tile = tiles.get(id);
  if (!tile) return;
  tile.gone = true;
  clearTimeout(tile.timer);
  if (tile.url) URL.revokeObjectURL(tile.url);
  tile.li.remove();
  tiles.delete(id);
  delete kibitz.tiles[id];
}

function showComment(tile) {
  const growing = tile.active && tile.text;
  tile.comment.textContent = growing ? tile.text : tile.summary.last_comment || "";
  tile.comment.dataset.active = growing ? "true" : "false";
  kibitz.tiles[tile.id].comment = tile.summary.last_comment || null;
}

/// Fetches the stream's newest frame, shows it once decoded, and asks again
/// THUMB_EVERY_MS later: never two at once per tile, none while the page is hidden.
async function pollThumb(tile) {
  if (tile.gone || tile.polling || document.hidden) return;
  clearTimeout(tile.timer);
  tile.polling = true;
  let pause = THUMB_EVERY_MS;
  try {
    const response = await fetch(`${streamPath(tile.id)}/frame`, { cache: "no-store" });
    if (response.ok) {
      await showThumb(tile, await response.blob(), response.headers.get("x-frame-seq"));
    } else {
      // 503: no picture yet; 404: the stream went (its event removes the tile).
      tile.overlay.hidden = false;
      pause = THUMB_RETRY_MS;
    }
  } catch (_) {
    pause = THUMB_RETRY_MS;
  } finally {
    tile.polling = false;
  }
  if (!tile.gone && !document.hidden) tile.timer = setTimeout(() => pollThumb(tile), pause);
}

async function showThumb(tile, blob, seq) {
  const url = URL.createObjectURL(blob);
  tile.img.src = url;
  let shown = true;
  try {
    await tile.img.decode();
  } catch (_) {
    shown = false; // A broken picture: keep asking.
  }
  if (tile.url) URL.revokeObjectURL(tile.url);
  tile.url = url;
  if (tile.gone) return;
  tile.overlay.hidden = shown;
  if (!shown) return;
  const stats = kibitz.tiles[tile.id];
  stats.loads += 1;
  if (seq !== null && seq !== tile.seq) stats.fresh += 1;
  tile.seq = seq;
  const hash = sample(tile.img);
  if (hash !== null && tile.lastSample !== null && hash !== tile.lastSample) stats.changes += 1;
  if (hash !== null) tile.lastSample = hash;
}

/// The newest alert per stream, for tiles made after it came.
const tileAlerts = new Map();

/// Highlights the tile of the alert's stream, with the rule, the comment and the clip; a
/// fresh one (`flash`) also pulses.
function showTileAlert(alert, flash) {
  const previous = tileAlerts.get(alert.stream);
  if (!previous || previous.time <= alert.time) tileAlerts.set(alert.stream, alert);
  const tile = tiles.get(alert.stream);
  if (!tile) return;
  const stats = kibitz.tiles[tile.id];
  if (flash || !tile.alertShown) stats.alerts += 1;
  if (tile.alertShown && tile.alertShown.time > alert.time) return;
  tile.alertShown = alert;
  tile.li.dataset.alert = "true";
  if (flash) {
    tile.li.classList.remove("flash");
    void tile.li.offsetWidth; // restarts the animation
    tile.li.classList.add("flash");
  }
  const note = tile.alertNote;
  note.hidden = false;
  note.querySelector(".alert-text").textContent =
    `⚠ ${alert.rule} · ${stamp(alert.time)}` + (alert.comment ? ` — ${alert.comment}` : "");
  const clip = note.querySelector(".clip");
  clip.href = alert.clip;
  clip.download = `${alert.stream}-alert-${alert.alert ?? alert.id}.mjpeg`;
  stats.alert = { rule: alert.rule, comment: alert.comment || null, clip: alert.clip, time: alert.time };
}

/// Alerts fired shortly before the overview opened.
async function loadRecentAlerts() {
  const answer = await api("GET", "/api/alerts", undefined, { ask: false });
  if (!answer.ok) return;
  const now = Date.now() + (kibitz.clockOffset || 0);
  for (const alert of answer.data.alerts || []) {
    if (now - alert.time > ALERT_RECENT_MS) continue;
    noteAlert({ ...alert, alert: alert.id });
    showTileAlert({ ...alert, alert: alert.id }, false);
  }
}

async function changeTileProfile(tile) {
  const wanted = tile.select.value;
  tile.changing = true;
  say(tile.message, "…", false);
  const answer = await api("PATCH", streamPath(tile.id), { profile: wanted });
  tile.changing = false;
  if (answer.ok) {
    say(tile.message, `profile ${answer.data.profile}`, false);
    showTile(answer.data);
  } else {
    say(tile.message, problem(answer), true);
    tile.select.value = tile.summary.profile;
  }
}

async function removeTile(tile) {
  const answer = await api("DELETE", streamPath(tile.id));
  if (answer.ok || answer.status === 404) {
    dropTile(tile.id);
    countTiles();
  } else {
    say(tile.message, problem(answer), true);
  }
}

async function addStream(event) {
  event.preventDefault();
  const form = $("add");
  const body = { source: $("add-source").value.trim() };
  for (const field of ["id", "profile", "instruction"]) {
    const value = $(`add-${field}`).value.trim();
    if (value) body[field] = value;
  }
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  $("add-submit").disabled = true;
  say($("add-message"), "starting…", false);
  const answer = await api("POST", "/api/streams", body);
  $("add-submit").disabled = false;
  if (answer.ok) {
    showTile(answer.data);
    countTiles();
    form.reset();
    say($("add-message"), `added ${answer.data.id}`, false);
    return;
  }
  say($("add-message"), problem(answer), true);
  const input = answer.data.field && $(`add-${answer.data.field}`);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
  countTiles();
}

// ==== one stream: `/streams/{id}` ==========================================================

let base = null;
const picture = $("picture");
let pictureRetry = null;
/// The stream's event connection (`reopen` when sound goes on or off).
let events = null;

function startSingle(id) {
  kibitz.view = "stream";
  kibitz.stream = id;
  base = streamPath(id);
  document.title = `${id} · kibitz`;
  $("title").textContent = id;
  $("source").hidden = false;
  $("single").hidden = false;
  startPicture();
  // With sound on the page is one of the stream's listeners.
  const eventsUrl = () => (kibitz.sound ? `${base}/stream?sound=on` : `${base}/stream`);
  events = listen(eventsUrl, streamEvents, (again) => {
    // After an outage the picture connection is likely gone as well.
    if (again) startPicture();
    refreshStatus();
  });
  startSound();
  recentShown = loadRecent(id);
  refreshStatus();
  setInterval(refreshStatus, STATUS_REFRESH_MS);
  $("ask").addEventListener("submit", askQuestion);
  $("question").addEventListener("input", () => $("question").removeAttribute("aria-invalid"));
  $("alert-form").addEventListener("submit", addRule);
  $("alert-rule").addEventListener("input", () => $("alert-rule").removeAttribute("aria-invalid"));
  $("vtt-link").href = `${base}/history.vtt`;
  $("vtt-link").download = `${id}.vtt`;
  loadRules();
  setInterval(samplePicture, 250);
  setInterval(() => { if (kibitz.retryAt !== null) renderSource(); }, 1000);
  $("profile").addEventListener("change", async (event) => {
    const select = event.target;
    if (!(await change({ profile: select.value }))) select.value = select.dataset.current || select.value;
  });
  $("instruction").addEventListener("input", () => { instructionEdited = true; });
  $("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    change({ instruction: $("instruction").value });
  });
  armedButton($("remove"), async () => {
    const answer = await api("DELETE", base);
    if (answer.ok) location.assign("/");
    else say($("message"), problem(answer), true);
  });
}

function startPicture() {
  clearTimeout(pictureRetry);
  // A fresh URL each time, so no cache hands back an old connection's picture.
  picture.src = `${base}/mjpeg?since=${Date.now()}`;
}

picture.addEventListener("load", () => { $("waiting").hidden = true; });
picture.addEventListener("error", () => {
  if (!base) return;
  $("waiting").hidden = false;
  $("waiting").textContent = kibitz.gone ? "this stream is not running" : "picture lost, reconnecting…";
  pictureRetry = setTimeout(startPicture, 2000);
});

function samplePicture() {
  const hash = sample(picture);
  if (hash === null) return;
  if (kibitz.lastSample !== null && hash !== kibitz.lastSample) kibitz.pictureChanges += 1;
  kibitz.lastSample = hash;
  $("waiting").hidden = true;
}

function renderCurrent(active) {
  const current = $("current");
  current.querySelector(".text").textContent = kibitz.text;
  current.dataset.active = active ? "true" : "false";
}

function addHistory(text, when, kind) {
  prependItem(listItem({ kind, when, text }));
}

/// One entry of the commentary list: `when` above, then for an answer its question (for an
/// alert its rule), the text, and for an alert a link to its clip.
function listItem({ kind, when, question, text, clip }) {
  const item = document.createElement("li");
  if (kind) item.className = kind;
  const label = document.createElement("span");
  label.className = "when";
  label.textContent = when || "";
  item.append(label);
  if (question !== undefined) {
    const asked = document.createElement("span");
    asked.className = "question";
    asked.textContent = question || "";
    item.append(asked);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text || "";
  item.append(body);
  if (clip) {
    const link = document.createElement("a");
    link.className = "clip";
    link.href = clip;
    link.textContent = "clip";
    link.title = "play the seconds of picture around it (shift-click: download)";
    link.download = clip.replace(/^.*\/alerts\/(\d+)\/clip$/, "alert-$1.mjpeg");
    link.addEventListener("click", (event) => {
      if (event.shiftKey) return;
      event.preventDefault();
      playClip(clip);
    });
    item.append(" ", link);
  }
  return item;
}

/// Newest at the top; the list keeps HISTORY_LIMIT entries.
function prependItem(item) {
  const history = $("history");
  history.prepend(item);
  while (history.children.length > HISTORY_LIMIT) history.lastElementChild.remove();
  $("empty").hidden = true;
}

/// "0:12.0–0:14.0 · 1.2 s": the media time of the frames and how late the words came.
function when(frames, latency) {
  const parts = [];
  if (frames && frames.length) {
    const first = clock(frames[0]);
    const last = clock(frames[frames.length - 1]);
    parts.push(first === last ? first : `${first}–${last}`);
  }
  if (typeof latency === "number") parts.push(`${latency.toFixed(1)} s`);
  return parts.join(" · ");
}

const streamEvents = {
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
    kibitz.tokens += 1;
    renderCurrent(true);
  },
  cycle_end(e) {
    // The full text is authoritative: it repairs tokens lost to a reconnect or lag.
    kibitz.text = "";
    kibitz.cycle = null;
    renderCurrent(false);
    if (!e.skipped && e.text) {
      kibitz.comments += 1;
      addHistory(e.text, when(e.frames, e.latency));
    }
    $("latency").textContent = secs(e.latency);
    $("delay").textContent = secs(e.target_delay);
  },
  error(e) {
    addHistory(e.message, "", "error");
    if (e.cycle === kibitz.cycle) {
      kibitz.text = "";
      renderCurrent(false);
    }
  },
  source(e) {
    showSource(e.state, e.detail, null);
  },
  speech(e) {
    playSpeech(e);
  },
  answer_start(e) {
    answerItem(e.answer, e.question, "event");
  },
  answer_token(e) {
    const answer = answerItem(e.answer);
    if (answer.done) return;
    answer.events += e.text;
    renderAnswer(answer);
  },
  answer_end(e) {
    const answer = answerItem(e.answer, e.question);
    answer.done = true;
    answer.text = e.text || "";
    answer.error = e.error || null;
    answer.latency = e.latency;
    renderAnswer(answer);
  },
  alert(e) {
    noteAlert({ ...e, stream: e.stream || kibitz.stream });
    prependItem(alertItem(e, false));
    flashPicture();
    loadRules();
  },
  lagged() {},
};

// ---- questions -------------------------------------------------------------------------------

/// id → {li, id, question, events (text from `answer_token`s), body (from the response, for
/// our own questions), text (the whole, from `answer_end`), error, latency, done, mine}.
const answerItems = new Map();

/// The list entry of answer `id`, made when first heard of (by its event or its response).
/// `fresh`: a question starts ("event": its `answer_start`, "mine": the response to ours);
/// a finished answer already under its id is from before a server restart (ids start
/// again), so the new one gets an entry of its own.
function answerItem(id, question, fresh) {
  id = Number(id);
  let answer = answerItems.get(id);
  if (answer && answer.done
    && (fresh === "event" || (fresh === "mine" && answer.question !== question))) {
    answer = null;
  }
  if (!answer) {
    const li = listItem({ kind: "answer", when: "answer", question: question || "", text: "" });
    li.dataset.answer = String(id);
    answer = { li, id, question: question || "", events: "", body: "", text: null, error: null, latency: null, done: false, mine: false };
    answerItems.set(id, answer);
    prependItem(li);
  }
  if (question && !answer.question) answer.question = question;
  renderAnswer(answer);
  return answer;
}

function renderAnswer(answer) {
  // Both the events and the response carry the same words; whichever has more so far.
  const text = answer.text !== null ? answer.text
    : answer.body.length > answer.events.length ? answer.body : answer.events;
  const parts = [answer.mine ? "answer to your question" : "answer"];
  if (typeof answer.latency === "number") parts.push(`${answer.latency.toFixed(1)} s`);
  answer.li.querySelector(".when").textContent = parts.join(" · ");
  answer.li.querySelector(".question").textContent = answer.question;
  answer.li.querySelector(".text").textContent = answer.error ? `no answer: ${answer.error}` : text;
  answer.li.classList.toggle("error", Boolean(answer.error));
  answer.li.dataset.active = answer.done ? "false" : "true";
  kibitz.answers[answer.id] = {
    question: answer.question, text, done: answer.done, error: answer.error, mine: answer.mine,
  };
}

/// The question box: `POST /ask`; the answer streams into the list from the response body
/// (and from the events, which every viewer gets). A refusal (429, 422) shows the reason.
async function askQuestion(event) {
  event.preventDefault();
  const box = $("question");
  const question = box.value.trim();
  if (!question) return;
  const button = $("ask-submit");
  const message = $("ask-message");
  button.disabled = true;
  say(message, "asking…", false);
  const init = {
    method: "POST",
    cache: "no-store",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ question }),
  };
  let response;
  try {
    response = await fetch(`${base}/ask`, init);
    if (response.status === 401 && (await signIn())) response = await fetch(`${base}/ask`, init);
  } catch (_) {
    say(message, "cannot reach the server", true);
    button.disabled = false;
    return;
  }
  button.disabled = false;
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    say(message, data.error || `the server said ${response.status}`, true);
    if (response.status === 422 || response.status === 400) box.setAttribute("aria-invalid", "true");
    return;
  }
  kibitz.asked += 1;
  box.value = "";
  say(message, "", false);
  const answer = answerItem(response.headers.get("x-answer-id") || `-${kibitz.asked}`, question, "mine");
  answer.mine = true;
  renderAnswer(answer);
  const decoder = new TextDecoder();
  try {
    const reader = response.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      answer.body += decoder.decode(value, { stream: true });
      renderAnswer(answer);
    }
    answer.body += decoder.decode();
  } catch (_) {
    // The connection broke; the events may still bring the rest.
    return;
  }
  // The whole answer is here even if its `answer_end` event never comes (events lagged).
  setTimeout(() => {
    if (answer.done) return;
    answer.done = true;
    answer.text = answer.body.trim();
    renderAnswer(answer);
  }, 2000);
}

// ---- alerts ----------------------------------------------------------------------------------

function noteAlert(e) {
  kibitz.alerts.push({
    alert: e.alert, stream: e.stream, rule: e.rule, rule_id: e.rule_id,
    comment: e.comment || null, time: e.time, clip: e.clip,
  });
  if (kibitz.alerts.length > HISTORY_LIMIT) kibitz.alerts.shift();
}

/// A fired alert in the commentary list, highlighted (`earlier`: from the history, no clip).
function alertItem(e, earlier) {
  return listItem({
    kind: earlier ? "alert earlier" : "alert",
    when: `alert · ${stamp(e.time)}`,
    question: e.rule,
    text: e.comment || "",
    clip: earlier ? null : e.clip,
  });
}

let flashTimer = null;

function flashPicture() {
  const frame = $("frame");
  clearTimeout(flashTimer);
  frame.dataset.alert = "false";
  void frame.offsetWidth; // restarts the animation
  frame.dataset.alert = "true";
  flashTimer = setTimeout(() => { frame.dataset.alert = "false"; }, ALERT_FLASH_MS);
}

/// rule id → its list entry.
const ruleItems = new Map();

async function loadRules() {
  if (!base) return;
  const answer = await api("GET", `${base}/alerts`, undefined, { ask: false });
  if (!answer.ok) return;
  const rules = answer.data.rules || [];
  kibitz.rules = rules;
  const list = $("rules");
  const listed = new Set();
  for (const rule of rules) {
    listed.add(rule.id);
    let item = ruleItems.get(rule.id);
    if (!item) {
      item = document.createElement("li");
      item.dataset.id = String(rule.id);
      item.innerHTML = `<span class="rule"></span><span class="muted detail"></span>
        <button type="button" class="quiet delete" title="delete this rule">delete</button>`;
      item.querySelector(".delete").addEventListener("click", () => deleteRule(rule.id, item));
      ruleItems.set(rule.id, item);
      list.append(item);
    }
    item.querySelector(".rule").textContent = rule.rule;
    const detail = [`cooldown ${rule.cooldown} s`, `${rule.checks} checks`, `fired ${rule.fired}×`];
    if (rule.last !== null && rule.last !== undefined) detail.push(`now ${rule.last ? "yes" : "no"}`);
    item.querySelector(".detail").textContent = detail.join(" · ");
    item.dataset.last = rule.last === true ? "yes" : rule.last === false ? "no" : "";
  }
  for (const [id, item] of [...ruleItems]) {
    if (!listed.has(id)) {
      item.remove();
      ruleItems.delete(id);
    }
  }
  $("rules-empty").hidden = rules.length > 0;
}

async function addRule(event) {
  event.preventDefault();
  const input = $("alert-rule");
  const body = { rule: input.value.trim() };
  if (!body.rule) return;
  const cooldown = $("alert-cooldown").value.trim();
  if (cooldown !== "") body.cooldown = Number(cooldown);
  $("alert-add").disabled = true;
  const answer = await api("POST", `${base}/alerts`, body);
  $("alert-add").disabled = false;
  if (!answer.ok) {
    say($("alert-message"), problem(answer), true);
    input.setAttribute("aria-invalid", "true");
    return;
  }
  input.value = "";
  $("alert-cooldown").value = "";
  say($("alert-message"), `rule added: “${answer.data.rule}”`, false);
  loadRules();
}

async function deleteRule(id, item) {
  const button = item.querySelector(".delete");
  button.disabled = true;
  const answer = await api("DELETE", `${base}/alerts/${id}`);
  button.disabled = false;
  if (answer.ok || answer.status === 404) {
    say($("alert-message"), "rule deleted", false);
  } else {
    say($("alert-message"), problem(answer), true);
  }
  loadRules();
}

/// Plays an alert's clip in the dialog: the Motion JPEG is JPEGs back to back, so it is
/// split at each start-of-image marker and the pictures drawn in turn, over and over.
let clipPlaying = 0;

async function playClip(url) {
  const dialog = $("clip");
  const canvas = $("clip-canvas");
  const context = canvas.getContext("2d");
  const playing = ++clipPlaying;
  $("clip-download").href = url;
  $("clip-download").download = url.replace(/^.*\/alerts\/(\d+)\/clip$/, "alert-$1.mjpeg");
  $("clip-title").textContent = "clip: loading…";
  $("clip-close").onclick = () => dialog.close();
  dialog.onclose = () => { if (clipPlaying === playing) clipPlaying += 1; };
  if (!dialog.open) dialog.showModal();
  let pictures;
  try {
    const response = await fetch(url, { cache: "no-store" });
    if (!response.ok) throw new Error(`the server said ${response.status}`);
    const bytes = new Uint8Array(await response.arrayBuffer());
    pictures = await Promise.all(splitJpegs(bytes).map(async (jpeg) => {
      const image = await createImageBitmap(new Blob([jpeg], { type: "image/jpeg" })).catch(() => null);
      return image && { image, at: clipTime(jpeg) };
    }));
    pictures = pictures.filter(Boolean);
  } catch (err) {
    $("clip-title").textContent = `clip: ${err.message || err}`;
    return;
  }
  if (playing !== clipPlaying) return;
  $("clip-title").textContent = `clip: ${pictures.length} pictures`;
  if (!pictures.length) return;
  // Each picture shows at its capture time, so the clip replays at the pace it was
  // captured; without times, at CLIP_FPS. After the last, as long as the average gap.
  const timed = pictures.every((p) => p.at !== null);
  const at = (i) => (timed ? pictures[i].at : (i * 1000) / CLIP_FPS);
  const span = at(pictures.length - 1);
  const loop = span + (pictures.length > 1 ? span / (pictures.length - 1) : 1000 / CLIP_FPS);
  canvas.width = pictures[0].image.width;
  canvas.height = pictures[0].image.height;
  kibitz.clip = { times: pictures.map((_, i) => at(i)), shown: [] };
  let i = 0;
  let started = performance.now();
  const step = () => {
    if (playing !== clipPlaying || !dialog.open) return;
    const n = i % pictures.length;
    if (n === 0 && i > 0) started += loop;
    context.drawImage(pictures[n].image, 0, 0, canvas.width, canvas.height);
    if (i < pictures.length) kibitz.clip.shown.push(performance.now() - started);
    i += 1;
    const next = i % pictures.length === 0 ? loop : at(i % pictures.length);
    setTimeout(step, Math.max(0, started + next - performance.now()));
  };
  step();
}

/// A clip picture's capture time (ms from the clip's first), from the comment segment the
/// server puts right after its start-of-image marker (`FF FE`, length, `kibitz-t=<ms>`);
/// null when it has none.
function clipTime(jpeg) {
  if (jpeg.length < 6 || jpeg[2] !== 0xff || jpeg[3] !== 0xfe) return null;
  const length = (jpeg[4] << 8) | jpeg[5];
  const text = new TextDecoder().decode(jpeg.subarray(6, 4 + length));
  const match = /^kibitz-t=(\d+)$/.exec(text);
  return match ? Number(match[1]) : null;
}

/// The JPEGs in a Motion JPEG: each starts with FF D8 FF (which entropy-coded data, where
/// every FF is followed by 00 or a marker, cannot hold).
function splitJpegs(bytes) {
  const starts = [];
  for (let i = 0; i + 2 < bytes.length; i += 1) {
    if (bytes[i] === 0xff && bytes[i + 1] === 0xd8 && bytes[i + 2] === 0xff) starts.push(i);
  }
  return starts.map((start, n) => bytes.subarray(start, n + 1 < starts.length ? starts[n + 1] : bytes.length));
}

// ---- the history -----------------------------------------------------------------------------

/// Resolves with how many earlier entries the view shows from the history (0 when it is off).
let recentShown = Promise.resolve(0);

/// Shows stream `id`'s last entries at once, below anything live: they came earlier.
async function loadRecent(id) {
  const opened = Date.now() + (kibitz.clockOffset || 0);
  const params = new URLSearchParams({ stream: id, limit: String(RECENT_ENTRIES) });
  const answer = await api("GET", `/api/history?${params}`, undefined, { ask: false });
  if (!answer.ok) {
    if (answer.status === 404) showHistoryOn(false);
    return 0;
  }
  showHistoryOn(true);
  // Newer ones the page has already seen live.
  const entries = (answer.data.entries || []).filter((entry) => entry.wall_ms <= opened);
  const history = $("history");
  for (const entry of entries) {
    if (history.children.length >= HISTORY_LIMIT) break;
    history.append(entryItem(entry));
  }
  if (entries.length) $("empty").hidden = true;
  kibitz.earlier = entries.length;
  return entries.length;
}

/// A stored entry in the commentary list.
function entryItem(entry) {
  if (entry.kind === "alert") {
    return alertItem({ rule: entry.question, comment: entry.text, time: entry.wall_ms }, true);
  }
  const parts = [stamp(entry.wall_ms)];
  const media = when([entry.media_start, entry.media_end].filter((t) => typeof t === "number"), entry.latency_s);
  if (media) parts.push(media);
  if (entry.kind === "answer") {
    return listItem({ kind: "answer earlier", when: `answer · ${parts.join(" · ")}`, question: entry.question || "", text: entry.text });
  }
  return listItem({ kind: "earlier", when: parts.join(" · "), text: entry.text });
}

/// Whether the server keeps a history: the search box and the WebVTT link show only then.
function showHistoryOn(on) {
  kibitz.historyOn = on;
  $("search").hidden = !on;
  $("vtt-link").hidden = !on || !base;
}

async function probeHistory() {
  const answer = await api("GET", "/api/history?limit=1", undefined, { ask: false });
  if (answer.ok) showHistoryOn(true);
  else if (answer.status === 404) showHistoryOn(false);
}

let searchTimer = null;
/// Counts searches, so an answer to an older one is dropped.
let searchSeq = 0;

function startSearch() {
  const box = $("search");
  box.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => search(false), SEARCH_DEBOUNCE_MS);
  });
  box.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      clearTimeout(searchTimer);
      search(false);
    } else if (event.key === "Escape") {
      box.value = "";
      closeResults();
    }
  });
  $("results-more").addEventListener("click", () => search(true));
  $("results-close").addEventListener("click", closeResults);
}

function closeResults() {
  searchSeq += 1;
  clearTimeout(searchTimer);
  $("results").hidden = true;
  $("results-list").replaceChildren();
  Object.assign(kibitz.search, { query: "", shown: 0, next: null, busy: false });
}

/// Searches for the box's words (`more`: the next page of the same search).
async function search(more) {
  const query = more ? kibitz.search.query : $("search").value.trim();
  if (!query) {
    closeResults();
    return;
  }
  if (more && !kibitz.search.next) return;
  const seq = ++searchSeq;
  const params = new URLSearchParams({ q: query, limit: String(SEARCH_PAGE) });
  if (more) params.set("before", kibitz.search.next);
  kibitz.search.busy = true;
  $("results").hidden = false;
  $("results-more").disabled = true;
  say($("results-message"), "searching…", false);
  const answer = await api("GET", `/api/history?${params}`, undefined, { ask: false });
  if (seq !== searchSeq) return;
  const state = kibitz.search;
  state.busy = false;
  $("results-more").disabled = false;
  if (!more) {
    $("results-list").replaceChildren();
    state.shown = 0;
  }
  state.query = query;
  if (!answer.ok) {
    state.next = null;
    $("results-more").hidden = true;
    say($("results-message"), problem(answer), true);
    return;
  }
  const entries = answer.data.entries || [];
  for (const entry of entries) $("results-list").append(resultItem(entry));
  state.shown += entries.length;
  state.next = answer.data.next || null;
  $("results-title").textContent = `“${query}”: ${state.shown}${state.next ? "+" : ""} found`;
  say($("results-message"), state.shown ? "" : "Nothing said matches that.", false);
  $("results-more").hidden = !state.next;
}

/// One search result: its stream (a link to its view), time, kind and text.
function resultItem(entry) {
  const item = document.createElement("li");
  item.className = "result";
  item.dataset.kind = entry.kind;
  item.innerHTML = `<span class="head"><span class="kind"></span><a class="stream"></a>
    <span class="muted time"></span></span><span class="question"></span><span class="text"></span>`;
  item.querySelector(".kind").textContent = entry.kind;
  const stream = item.querySelector(".stream");
  stream.textContent = entry.stream;
  stream.href = `/streams/${encodeURIComponent(entry.stream)}`;
  const media = when([entry.media_start, entry.media_end].filter((t) => typeof t === "number"), null);
  item.querySelector(".time").textContent = [stamp(entry.wall_ms), media].filter(Boolean).join(" · ");
  item.querySelector(".time").title = new Date(entry.wall_ms).toString();
  const question = item.querySelector(".question");
  question.textContent = entry.question || "";
  question.hidden = !entry.question;
  item.querySelector(".text").textContent = entry.text;
  return item;
}

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

let statusSeen = false;

async function refreshStatus() {
  const answer = await api("GET", `${base}/status`, undefined, { ask: false });
  if (answer.status === 404) {
    kibitz.gone = true;
    showSource("stopped", answer.data.error, null);
    $("waiting").hidden = false;
    $("waiting").textContent = "this stream is not running";
    return;
  }
  if (!answer.ok) return; // The server is restarting; the next poll will tell.
  if (kibitz.gone) {
    kibitz.gone = false;
    startPicture();
  }
  const status = answer.data;
  const source = status.source || {};
  showSource(source.state, source.detail, source.retry_in);
  $("fps").textContent = typeof source.fps === "number" ? source.fps.toFixed(source.fps % 1 ? 2 : 0) : "–";
  $("delay").textContent = secs(status.target_delay);
  const tally = status.commentary || {};
  $("cycles").textContent = (tally.cycles_done || 0) - (tally.cycles_skipped || 0);
  $("skipped").textContent = tally.cycles_skipped || 0;
  if (typeof tally.last_latency === "number") $("latency").textContent = secs(tally.last_latency);
  const engine = status.engine || {};
  // An engine on its way says where it is (the banner has the details), not "down".
  const waiting = engine.readiness && engine.readiness.state !== "ready" ? engine.readiness.state : null;
  $("engine").textContent = [engine.kind, engine.model, engine.backend].filter(Boolean).join(" · ")
    + (waiting ? ` · ${waiting}` : engine.healthy === false ? " · down" : "");
  showSelection(tally.profile, tally.instruction);
  showVoice(status.settings && status.settings.voice, status.speech);
  if (!statusSeen && tally.last_comment) {
    // A newly opened view shows what was last said at once, not after the next cycle:
    // from the history when the server keeps one, else the status's last comment.
    const last = tally.last_comment;
    recentShown.then((shown) => {
      if (shown === 0 && kibitz.comments === 0) addHistory(last, "before you came", "earlier");
    });
  }
  loadRules();
  statusSeen = true;
}

/// Whether the instruction box holds an edit not yet applied.
let instructionEdited = false;

/// Shows the stream's profile and instruction, except in a control the person is busy with.
function showSelection(profile, instruction) {
  const select = $("profile");
  if (profile) {
    select.dataset.current = profile;
    if (document.activeElement !== select && !select.disabled) select.value = profile;
  }
  const box = $("instruction");
  if (typeof instruction === "string" && !instructionEdited && document.activeElement !== box) {
    box.value = instruction;
  }
}

async function change(body) {
  $("apply").disabled = true;
  $("profile").disabled = true;
  try {
    const answer = await api("PATCH", base, body);
    if (!answer.ok) {
      say($("message"), problem(answer), true);
      return false;
    }
    const { profile, instruction } = answer.data;
    $("profile").disabled = false;
    if ("instruction" in body) instructionEdited = false;
    showSelection(profile, instruction);
    say($("message"), instruction ? `profile ${profile}, instruction set` : `profile ${profile}`, false);
    return true;
  } finally {
    $("apply").disabled = false;
    $("profile").disabled = false;
  }
}

// ---- sound: the spoken commentary -----------------------------------------------------------

/// Milliseconds since the unix epoch on this page's clock, finer than `Date.now()` and
/// steady (`performance.now()` never jumps).
function wallNow() {
  return performance.timeOrigin + performance.now();
}

/// Measures the server's clock against this page's: a few round trips to `/api/clock`,
/// and from the quickest, offset = server - midpoint (the server read its clock about
/// half way). Resolves with whether it worked.
async function syncClock() {
  let best = null;
  for (let i = 0; i < CLOCK_SAMPLES; i += 1) {
    try {
      const t0 = wallNow();
      const response = await fetch("/api/clock", { cache: "no-store" });
      const data = await response.json();
      const t1 = wallNow();
      if (!response.ok || typeof data.now_ms !== "number") break;
      if (!best || t1 - t0 < best.rtt) best = { rtt: t1 - t0, offset: data.now_ms - (t0 + t1) / 2 };
    } catch (_) {
      break;
    }
  }
  if (!best) return false;
  kibitz.clockOffset = best.offset;
  kibitz.clockRtt = best.rtt;
  return true;
}

/// Resolves once the clock offset is known (or could not be learned: then it is taken as
/// zero, right when the server runs on this machine).
let clockReady = null;

const sound = {
  context: null,
  gain: null,
  /// Clips scheduled or playing: {record, source, timer}.
  playing: new Set(),
  /// Why this browser cannot play the sound, if it cannot.
  problem: null,
};

function startSound() {
  clockReady = syncClock();
  setInterval(syncClock, CLOCK_REFRESH_MS);
  $("speech-link").href = `${location.origin}${base}/speech`;
  $("sound").addEventListener("click", toggleSound);
  $("volume").addEventListener("input", setVolume);
  $("voice").addEventListener("change", changeVoice);
  renderSound();
}

/// The click that browsers want before any audio: it makes (or wakes) the AudioContext,
/// and only then does the page ask to be a listener.
function toggleSound() {
  if (!kibitz.sound) {
    const AudioContext = window.AudioContext || window.webkitAudioContext;
    if (!AudioContext) {
      sound.problem = "this browser cannot play sound";
      renderSound();
      return;
    }
    if (!sound.context) {
      sound.context = new AudioContext({ latencyHint: "interactive" });
      sound.gain = sound.context.createGain();
      sound.gain.connect(sound.context.destination);
      sound.context.onstatechange = renderSound;
      setVolume();
    }
    // In the click's own turn: later, the browser no longer counts it as the person's.
    // Only once the context runs does the page become a listener (a context that does
    // not say within a second is given the benefit of the doubt).
    const resumed = sound.context.resume().catch(() => {});
    kibitz.sound = true;
    renderSound();
    Promise.race([resumed, new Promise((done) => setTimeout(done, 1000))]).then(() => {
      if (kibitz.sound) events.reopen();
    });
  } else {
    kibitz.sound = false;
    for (const clip of [...sound.playing]) stopClip(clip);
    if (sound.context) sound.context.suspend().catch(() => {});
    renderSound();
    events.reopen();
  }
}

function setVolume() {
  const value = Number($("volume").value) / 100;
  if (!sound.gain) return;
  // Squared: the ear hears loudness roughly so. A short ramp: no click.
  sound.gain.gain.setTargetAtTime(value * value, sound.context.currentTime, 0.02);
}

function renderSound() {
  const button = $("sound");
  button.setAttribute("aria-pressed", kibitz.sound ? "true" : "false");
  button.textContent = kibitz.sound ? "sound on" : "sound off";
  button.title = kibitz.sound ? "stop the sound" : "hear the commentary, in step with the picture";
  $("volume").disabled = !kibitz.sound;
  const speaking = sound.playing.size > 0 && [...sound.playing].some((c) => c.record.started && !c.record.ended);
  $("speaking").dataset.on = speaking ? "true" : "false";
  const voice = kibitz.voice || "";
  if (sound.problem) say($("sound-note"), sound.problem, true);
  else if (voice.startsWith("off (")) say($("sound-note"), `the voice did not start: ${voice.slice(5, -1)}`, true);
  else if (kibitz.sound && voice.startsWith("off")) say($("sound-note"), "this stream has no voice", false);
  else if (kibitz.sound && sound.context && sound.context.state !== "running") {
    say($("sound-note"), "waiting for the browser to allow sound…", false);
  } else say($("sound-note"), "", false);
}

/// This page's AudioContext clock against its wall clock: the context time being heard at
/// local ms `wall`, and back. From the browser's own output timestamp, so the output
/// latency is counted; before the context runs, from its current time.
function contextTimeAt(wall) {
  const c = sound.context;
  const stamp = c.getOutputTimestamp ? c.getOutputTimestamp() : null;
  if (stamp && stamp.performanceTime > 0) {
    return stamp.contextTime + (wall - (performance.timeOrigin + stamp.performanceTime)) / 1000;
  }
  return c.currentTime + (wall - wallNow()) / 1000 - (c.outputLatency || c.baseLatency || 0);
}

function wallAt(contextTime) {
  const c = sound.context;
  const stamp = c.getOutputTimestamp ? c.getOutputTimestamp() : null;
  if (stamp && stamp.performanceTime > 0) {
    return performance.timeOrigin + stamp.performanceTime + (contextTime - stamp.contextTime) * 1000;
  }
  return wallNow() + (contextTime - c.currentTime + (c.outputLatency || c.baseLatency || 0)) * 1000;
}

/// One `speech` event: fetch the clip, decode it, and start it when the picture shows
/// what it says (`play_at`, server ms). Already late by up to LATE_OK_MS: from the start,
/// at once. Later: at once, part way in, so the words still meet their picture; skipped
/// when more than half of it is gone.
async function playSpeech(e) {
  if (!kibitz.sound || !sound.context) {
    kibitz.speechIgnored += 1;
    return;
  }
  const record = {
    cycle: e.cycle,
    playAt: e.play_at,
    duration: e.duration,
    receivedAt: wallNow(),
    scheduledAt: null,
    offset: 0,
    late: null,
    started: false,
    ended: false,
    skipped: null,
  };
  kibitz.speech.push(record);
  if (kibitz.speech.length > SPEECH_KEPT) kibitz.speech.shift();
  const context = sound.context;
  let buffer;
  try {
    const response = await fetch(e.clip, { cache: "no-store" });
    if (!response.ok) throw new Error(`the server said ${response.status}`);
    const bytes = await response.arrayBuffer();
    buffer = await context.decodeAudioData(bytes);
    await clockReady;
  } catch (err) {
    record.skipped = `cannot play the clip: ${err.message || err}`;
    return;
  }
  // Sound went off (or on again: a fresh connection) while the clip loaded.
  if (!kibitz.sound || context !== sound.context) {
    record.skipped = "sound off";
    return;
  }
  const playAt = e.play_at - (kibitz.clockOffset || 0);
  const late = wallNow() - playAt;
  record.late = late;
  let when = contextTimeAt(playAt);
  let offset = 0;
  if (late > LATE_OK_MS) {
    offset = late / 1000;
    if (offset > buffer.duration / 2) {
      record.skipped = `${Math.round(late)} ms late`;
      return;
    }
    when = 0;
  } else if (late > 0) {
    when = 0;
  }
  const source = context.createBufferSource();
  source.buffer = buffer;
  source.connect(sound.gain);
  const clip = { record, source, timer: null };
  sound.playing.add(clip);
  source.onended = () => {
    record.ended = true;
    clearTimeout(clip.timer);
    sound.playing.delete(clip);
    renderSound();
  };
  source.start(when, offset);
  // A start in the past means now: the next render quantum.
  const starts = Math.max(when, context.currentTime);
  record.offset = offset;
  record.scheduledAt = wallAt(starts) - offset * 1000;
  // Started once the context's clock has passed the start while running (no event says so).
  const check = () => {
    if (record.ended || !sound.playing.has(clip)) return;
    if (context.state === "running" && context.currentTime >= starts) {
      record.started = true;
      renderSound();
    } else {
      clip.timer = setTimeout(check, 20);
    }
  };
  clip.timer = setTimeout(check, Math.max(0, wallAt(starts) - wallNow()));
}

function stopClip(clip) {
  clearTimeout(clip.timer);
  sound.playing.delete(clip);
  try {
    clip.source.stop();
  } catch (_) {
    // Never started: nothing to stop.
  }
  clip.record.ended = true;
}

/// Shows the stream's voice (`setting`, as chosen) and how it is doing (`speech`, from the
/// status: the voice in use, `off (…)` with the reason when it could not start).
function showVoice(setting, speech) {
  const select = $("voice");
  const chosen = setting || (speech && speech.voice);
  if (chosen) {
    select.dataset.current = chosen;
    if (document.activeElement !== select && !select.disabled) {
      fillVoices();
    }
  }
  kibitz.voice = speech ? speech.voice : chosen || null;
  const voiced = Boolean(kibitz.voice) && !kibitz.voice.startsWith("off");
  $("speech-link").hidden = !voiced;
  $("spoken-meta").hidden = !speech || !(voiced || speech.spoken);
  if (speech) {
    $("spoken").textContent = speech.too_late ? `${speech.spoken} · ${speech.too_late} too late` : speech.spoken;
    $("spoken").title = "comments spoken · shown only, their turn to speak came too late";
  }
  renderSound();
}

/// The voice picker: the voices offered, plus the stream's own if it is not among them.
function fillVoices() {
  const select = $("voice");
  const current = select.dataset.current || select.value;
  const names = [...voiceNames];
  if (current && !names.includes(current)) names.push(current);
  select.replaceChildren(...names.map((name) => new Option(name, name)));
  if (current) select.value = current;
  select.disabled = names.length === 0;
}

async function changeVoice() {
  const select = $("voice");
  const wanted = select.value;
  select.disabled = true;
  try {
    const answer = await api("PATCH", base, { voice: wanted });
    if (!answer.ok) {
      say($("message"), problem(answer), true);
      select.value = select.dataset.current || wanted;
      return;
    }
    select.dataset.current = wanted;
    say($("message"), wanted === "off" ? "voice off" : `voice ${wanted}`, false);
  } finally {
    select.disabled = false;
  }
  refreshStatus();
}

// ---- the engine on its way ------------------------------------------------------------
// Until the engine is ready (a first run downloads the model), a banner says what it waits
// for: the download with its bar, size, speed and time left, then the load, or one line
// saying what is missing and where it goes. From `/readyz`, which needs no token; the
// video plays meanwhile.

const READINESS_REFRESH_MS = 1000;
/// Once ready, a look now and then in case the engine goes down.
const READY_REFRESH_MS = 15000;

/// Shows what `/readyz` says; true when the engine is ready.
async function refreshReadiness() {
  let body;
  try {
    const response = await fetch("/readyz", { cache: "no-store" });
    body = await response.json();
  } catch {
    return false; // The server is restarting; the next look will tell.
  }
  kibitz.readiness = body;
  const banner = $("readiness");
  banner.hidden = body.ready === true;
  banner.dataset.state = body.state || "";
  $("readiness-text").textContent = body.ready ? "" : (body.message || body.state || "");
  const download = body.download;
  const bar = $("readiness-bar");
  bar.hidden = body.ready || !(download && download.total > 0);
  if (!bar.hidden) bar.value = download.bytes / download.total;
  return body.ready === true;
}

function startReadiness() {
  const look = async () => {
    const ready = await refreshReadiness();
    setTimeout(look, ready ? READY_REFRESH_MS : READINESS_REFRESH_MS);
  };
  look();
}

// ---- start ---------------------------------------------------------------------------

async function start() {
  startReadiness();
  await loadSession();
  loadProfiles();
  startSearch();
  probeHistory();
  const match = location.pathname.match(/^\/streams\/([^/]+)\/?$/);
  if (match) startSingle(decodeURIComponent(match[1]));
  else startOverview();
}

start();
