// The first minute in Debian's Chromium (playwright-core): how long from the click on
// "start" to a chat whose prompt takes typing, and what went over the wire.
// Used by tests/browser/test_first_minute.py and tests/bench/bench_browser.py.
//
//   node click.mjs SPEC_JSON
//
// SPEC: {mode, profile, base?, url?, user?, password?, read_ms?, throttle?, reload?}
//   mode "lovd":   open BASE/ (the landing page), wait READ_MS (a person reading; the
//                  page's prefetch runs meanwhile), click start → the chat's prompt.
//   mode "direct": open URL (a chat on a container's own port, HTTP Basic USER/PASSWORD
//                  sent as a header: the browser's cache on, as on the lovd side)
//                  → the chat's prompt. The same UI without lovd, Caddy or the gate.
//   throttle:      {latency_ms, mbit} via CDP Network.emulateNetworkConditions.
//   spki:          base64(sha256(SPKI)) of the site's self-signed certificate (https):
//                  Chromium trusts that one key as if a known CA had signed it, so its
//                  HTTP cache works as on a real site (with --ignore-certificate-errors
//                  or ignoreHTTPSErrors it stores nothing).
//   reload:        after the prompt, reload and report whether the same chat is shown.
//   fail_start_fetch: the landing page's script's fetch of the start fails (the network
//                  drops it): the page must fall back to its form.
//   trace:         also report a timeline after the click: each request (start, first
//                  byte, end in ms from the click) and the main thread's busy time by kind
//                  (Chromium's devtools.timeline trace).
// Prints one JSON line.
import { chromium } from "playwright-core";

const spec = JSON.parse(process.argv[2]);

// Main-thread time between the click and the prompt, by trace event name (top-level
// tasks' children: script evaluation, compile, parse HTML, style, layout, paint, GC), and
// the first and last script evaluation in ms from the click. The click is the trace's
// first instant; the page sets no marks of its own.
function summarize(events, span_ms) {
  const start = Math.min(...events.filter((e) => e.ph === "X" || e.ph === "B").map((e) => e.ts));
  const tasks = events.filter((e) => e.ph === "X" && e.dur && e.name === "RunTask");
  const main = new Map();
  for (const t of tasks) main.set(t.tid, (main.get(t.tid) || 0) + t.dur);
  const tid = [...main.entries()].sort((a, b) => b[1] - a[1])[0]?.[0];
  const by = {};
  const wanted = new Set(["EvaluateScript", "v8.compile", "v8.compileModule", "v8.evaluateModule",
    "FunctionCall", "ParseHTML", "UpdateLayoutTree", "Layout", "Paint", "MajorGC", "MinorGC",
    "V8.GC_MC_BACKGROUND_MARKING", "TimerFire", "EventDispatch", "v8.produceModuleCache",
    "v8.parseOnBackground", "ResourceReceivedData", "XHRReadyStateChange", "FireAnimationFrame"]);
  for (const e of events) {
    if (e.tid !== tid || e.ph !== "X" || !e.dur || !wanted.has(e.name)) continue;
    by[e.name] = Math.round(((by[e.name] || 0) + e.dur / 1000) * 10) / 10;
  }
  const busy = tasks.filter((t) => t.tid === tid).reduce((a, t) => a + t.dur, 0) / 1000;
  return { span_ms, busy_ms: Math.round(busy), by_kind: by, start_us: start };
}
const result = { mode: spec.mode, ok: false };
const ctx = await chromium.launchPersistentContext(spec.profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  locale: "nb-NO",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         ...(spec.spki ? [`--ignore-certificate-errors-spki-list=${spec.spki}`] : [])],
  viewport: { width: 1280, height: 800 },
  // HTTP Basic as a plain header on every request. Not Playwright's httpCredentials:
  // that pauses every request in CDP's Fetch domain and turns Chromium's HTTP cache off,
  // which is not how a person's browser loads the page (with the cache on, Chromium
  // makes identical GETs in flight wait for each other: the UI's four of /session/<id>).
  ...(spec.user ? { extraHTTPHeaders: { Authorization: "Basic " +
    Buffer.from(spec.user + ":" + spec.password).toString("base64") } } : {}),
});
try {
  const page = ctx.pages()[0] || (await ctx.newPage());
  const cdp = await ctx.newCDPSession(page);
  await cdp.send("Network.enable");
  if (spec.throttle) {
    const bps = (spec.throttle.mbit * 1e6) / 8;
    await cdp.send("Network.emulateNetworkConditions", {
      offline: false, latency: spec.throttle.latency_ms,
      downloadThroughput: bps, uploadThroughput: bps,
    });
  }
  // Every response: bytes on the wire (encodedDataLength at loadingFinished), whether it
  // came from the browser's cache, and the headers that matter here.
  const reqs = new Map();
  let phase = "before";
  let t0;
  const now = () => (t0 === undefined ? -1 : Date.now() - t0);
  cdp.on("Network.requestWillBeSent", (e) => {
    const prev = reqs.get(e.requestId); // a redirect keeps its id: keep the first start
    reqs.set(e.requestId, { url: e.request.url, method: prev ? prev.method : e.request.method,
      phase: prev ? prev.phase : phase, bytes: 0,
      type: e.type || "",
      cached: false, encoding: "", cache_control: "", t_start: prev ? prev.t_start : now() });
  });
  cdp.on("Network.requestServedFromCache", (e) => {
    const r = reqs.get(e.requestId); if (r) r.cached = true;
  });
  cdp.on("Network.responseReceived", (e) => {
    const r = reqs.get(e.requestId); if (!r) return;
    const h = Object.fromEntries(Object.entries(e.response.headers).map(([k, v]) => [k.toLowerCase(), v]));
    r.status = e.response.status;
    r.protocol = e.response.protocol || "";
    r.t_head = now();
    r.encoding = h["content-encoding"] || "";
    r.cache_control = h["cache-control"] || "";
    r.cached = r.cached || e.response.fromDiskCache || e.response.fromPrefetchCache || false;
  });
  cdp.on("Network.loadingFinished", (e) => {
    const r = reqs.get(e.requestId); if (r) { r.bytes = e.encodedDataLength; r.t_end = now(); }
  });
  const events = [];
  if (spec.trace) {
    cdp.on("Tracing.dataCollected", (e) => events.push(...e.value));
  }
  const startTrace = () => cdp.send("Tracing.start", {
    transferMode: "ReportEvents",
    traceConfig: { includedCategories: ["devtools.timeline", "v8", "v8.execute",
      "disabled-by-default-devtools.timeline", "blink.user_timing", "loading"] },
  });
  result.page_errors = [];
  page.on("pageerror", (e) => result.page_errors.push(String(e).slice(0, 300)));
  result.console_errors = [];
  page.on("console", (m) => {
    if (m.type() === "error" && result.console_errors.length < 20)
      result.console_errors.push(m.text().slice(0, 300));
  });
  if (spec.fail_start_fetch) {
    await page.route("**/_lovd/start", (route) =>
      route.request().resourceType() === "fetch" ? route.abort("connectionreset") : route.continue());
  }
  const prompt = () => page.locator('[data-component="prompt-input"]').first();
  const inChat = async () =>
    /\/session\/ses_/.test(new URL(page.url()).pathname) && (await prompt().isVisible());
  // Every address the page showed while the chat loaded (sampled every 25 ms): a UI
  // that moves itself from one chat route to another shows two.
  result.paths_seen = [];
  const waitChat = async (ms) => {
    const end = Date.now() + ms;
    while (Date.now() < end) {
      const seen = new URL(page.url()).pathname;
      if (result.paths_seen.at(-1) !== seen) result.paths_seen.push(seen);
      if (await inChat().catch(() => false)) return true;
      await page.waitForTimeout(25);
    }
    // What the page showed instead: the UI's components on screen and every request that
    // failed or never finished, so a failure says where the page got stuck.
    result.stuck = {
      url: page.url(),
      components: await page.evaluate(() => [...new Set([...document.querySelectorAll(
        "[data-component]")].map((e) => e.getAttribute("data-component")))].slice(0, 40))
        .catch((e) => [String(e)]),
      text: (await page.evaluate(() => document.body.innerText).catch(() => "")).slice(0, 400),
      requests: [...reqs.values()].filter((r) => !(r.status < 400) || r.t_end === undefined)
        .map((r) => [r.method, r.status ?? 0, r.url.replace(/^https?:\/\/[^/]+/, "").slice(0, 90)])
        .slice(0, 30),
    };
    throw new Error("no chat prompt within " + ms + " ms at " + page.url());
  };
  if (spec.clear_cookies) await ctx.clearCookies(); // a returning visitor's new session
  if (spec.mode === "lovd") {
    await page.goto(spec.base + "/", { waitUntil: "load" });
    await page.waitForTimeout(spec.read_ms ?? 2000);
    // Where the person's pointer goes, found before the clock starts: Playwright's own
    // checks before a locator click (visible, stable over two frames, hit target) took
    // ~50 ms that are no part of a person's wait; the clock starts at the click itself.
    const button = page.locator('form[action="/_lovd/start"] button').first();
    await button.scrollIntoViewIfNeeded();
    const box = await button.boundingBox();
    if (spec.trace) await startTrace();
    phase = "after";
    t0 = Date.now();
    if (box) await page.mouse.click(box.x + box.width / 2, box.y + box.height / 2);
    else await button.click();
  } else {
    if (spec.trace) await startTrace();
    phase = "after";
    t0 = Date.now();
    await page.goto(spec.url, { waitUntil: "commit" });
  }
  await waitChat(60000);
  result.click_to_prompt_ms = Date.now() - t0;
  if (spec.trace) {
    await page.evaluate(() => performance.mark("lovd-prompt")).catch(() => {});
  }
  result.chat_path = new URL(page.url()).pathname;
  await page.waitForTimeout(300); // late requests of the first paint
  const list = [...reqs.values()].filter((r) => r.phase === "after");
  if (spec.trace) {
    const done = new Promise((ok) => cdp.once("Tracing.tracingComplete", ok));
    await cdp.send("Tracing.end");
    await done;
    result.timeline = list.map((r) => [r.t_start, r.t_head ?? -1, r.t_end ?? -1, r.method,
      r.status ?? 0, r.bytes, r.cached, r.url.replace(/^https?:\/\/[^/]+/, "").slice(0, 90)])
      .sort((a, b) => a[0] - b[0]);
    result.main_thread = summarize(events, result.click_to_prompt_ms);
  }
  const before = [...reqs.values()].filter((r) => r.phase === "before");
  const path = (r) => { try { return new URL(r.url).pathname; } catch { return r.url; } };
  const assets = list.filter((r) => path(r).startsWith("/assets/"));
  // The UI's API calls after the click (fetch/XHR to the session, not lovd's own start
  // nor the event stream): time from the page asking to the answer's first byte, queueing
  // for a connection included, as the page waits for it.
  const api = list.filter((r) => (r.type === "Fetch" || r.type === "XHR") && r.t_head >= 0 &&
    !r.cached && !path(r).startsWith("/_lovd/") && path(r) !== "/global/event")
    .map((r) => r.t_head - r.t_start).sort((a, b) => a - b);
  result.api_ttfb_ms = api.length ? api[Math.floor((api.length - 1) / 2)] : -1;
  result.api_calls = api.length;
  // The chat's own record (GET /session/ses_…), which the UI asks for several times at
  // once: bytes on the wire of each answer (0: it shared another request's answer).
  result.chat_record_bytes = list.filter((r) => r.method === "GET" &&
    /^\/session\/ses_[A-Za-z0-9]+$/.test(path(r))).map((r) => r.bytes);
  result.requests = list.length;
  // Requests after the click by the protocol their response names ("http/1.1", "h2").
  result.protocols = {};
  for (const r of list) if (r.protocol) result.protocols[r.protocol] = (result.protocols[r.protocol] || 0) + 1;
  // A new document after the click (the form's redirect chain, the UI's HTML shell), or
  // none: the landing page ran the UI in place (lovd/web/static/instant.js).
  result.documents_after_click = list.filter((r) => r.type === "Document")
    .map((r) => [r.method, r.status ?? 0, path(r)]);
  result.start_fetches = list.filter((r) => r.type === "Fetch" && path(r) === "/_lovd/start")
    .map((r) => r.status ?? 0);
  result.bytes = list.reduce((a, r) => a + r.bytes, 0);
  result.bytes_before_click = before.reduce((a, r) => a + r.bytes, 0);
  result.asset_bytes = assets.reduce((a, r) => a + r.bytes, 0);
  result.assets = assets.length;
  result.after_assets = assets.map((r) => ({ path: path(r), cached: r.cached, bytes: r.bytes }));
  result.assets_cached = assets.filter((r) => r.cached).length;
  result.assets_immutable = assets.filter((r) => r.cache_control.includes("immutable")).length;
  result.unhashed_assets = assets.map(path).filter((p) => !/-[A-Za-z0-9_-]{8}\.[a-z0-9]+$/.test(p));
  result.assets_compressed = assets.filter((r) => r.encoding).length;
  result.main_bundle = assets.filter((r) => /\/assets\/index-[^/]*\.js$/.test(path(r)))
    .map((r) => ({ path: path(r), cached: r.cached, bytes: r.bytes, encoding: r.encoding }));
  result.prefetched = before.filter((r) => path(r).startsWith("/assets/"))
    .map((r) => ({ path: path(r), bytes: r.bytes, encoding: r.encoding,
                   immutable: r.cache_control.includes("immutable") }));
  result.biggest_before_click = before.sort((a, b) => b.bytes - a.bytes).slice(0, 8)
    .map((r) => [path(r), r.bytes, r.encoding, r.cached]);
  result.biggest = list.sort((a, b) => b.bytes - a.bytes).slice(0, 5)
    .map((r) => [path(r), r.bytes, r.encoding, r.cached]);
  if (spec.reload) {
    const before_path = result.chat_path;
    phase = "reload";
    await page.reload({ waitUntil: "commit" });
    await waitChat(60000);
    const again = [...reqs.values()].filter((r) => r.phase === "reload");
    result.reload_main_bundle = again.filter((r) => /\/assets\/index-[^/]*\.js$/.test(path(r)))
      .map((r) => ({ path: path(r), cached: r.cached, bytes: r.bytes }));
    const reloaded = again.filter((r) => path(r).startsWith("/assets/"));
    result.reload_assets = reloaded.length;
    result.reload_cached = reloaded.filter((r) => r.cached).length;
    result.reload_immutable = reloaded.filter((r) => r.cache_control.includes("immutable")).length;
    result.reload_compressed = reloaded.filter((r) => r.encoding).length;
    result.reload_unhashed = reloaded.map(path).filter((p) => !/-[A-Za-z0-9_-]{8}\.[a-z0-9]+$/.test(p));
    result.reload_documents = again.filter((r) => r.type === "Document")
      .map((r) => [r.method, r.status ?? 0, path(r)]);
    result.reload_same_chat = new URL(page.url()).pathname.split("/").pop() ===
      before_path.split("/").pop();
    result.reload_path = new URL(page.url()).pathname;
  }
  result.ok = true;
} catch (e) {
  result.error = String(e && e.stack || e);
} finally {
  await ctx.close();
}
console.log(JSON.stringify(result));
