// The first minute in Debian's Chromium (playwright-core): how long from the click on
// "start" to a chat whose prompt takes typing, and what went over the wire.
// Used by tests/browser/test_first_minute.py and tests/bench/bench_browser.py.
//
//   node click.mjs SPEC_JSON
//
// SPEC: {mode, profile, base?, url?, user?, password?, read_ms?, throttle?, reload?}
//   mode "lovd":   open BASE/ (the landing page), wait READ_MS (a person reading; the
//                  page's prefetch runs meanwhile), click start → the chat's prompt.
//   mode "direct": open URL (a chat on a container's own port, HTTP Basic USER/PASSWORD)
//                  → the chat's prompt. The same UI without lovd, Caddy or the gate.
//   throttle:      {latency_ms, mbit} via CDP Network.emulateNetworkConditions.
//   reload:        after the prompt, reload and report whether the same chat is shown.
// Prints one JSON line.
import { chromium } from "playwright-core";

const spec = JSON.parse(process.argv[2]);
const result = { mode: spec.mode, ok: false };
const ctx = await chromium.launchPersistentContext(spec.profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  locale: "nb-NO",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"],
  viewport: { width: 1280, height: 800 },
  ...(spec.user ? { httpCredentials: { username: spec.user, password: spec.password } } : {}),
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
  cdp.on("Network.requestWillBeSent", (e) => {
    reqs.set(e.requestId, { url: e.request.url, phase, bytes: 0, cached: false, encoding: "", cache_control: "" });
  });
  cdp.on("Network.requestServedFromCache", (e) => {
    const r = reqs.get(e.requestId); if (r) r.cached = true;
  });
  cdp.on("Network.responseReceived", (e) => {
    const r = reqs.get(e.requestId); if (!r) return;
    const h = Object.fromEntries(Object.entries(e.response.headers).map(([k, v]) => [k.toLowerCase(), v]));
    r.status = e.response.status;
    r.encoding = h["content-encoding"] || "";
    r.cache_control = h["cache-control"] || "";
    r.cached = r.cached || e.response.fromDiskCache || e.response.fromPrefetchCache || false;
  });
  cdp.on("Network.loadingFinished", (e) => {
    const r = reqs.get(e.requestId); if (r) r.bytes = e.encodedDataLength;
  });
  const prompt = () => page.locator('[data-component="prompt-input"]').first();
  const inChat = async () =>
    /\/session\/ses_/.test(new URL(page.url()).pathname) && (await prompt().isVisible());
  const waitChat = async (ms) => {
    const end = Date.now() + ms;
    while (Date.now() < end) {
      if (await inChat().catch(() => false)) return true;
      await page.waitForTimeout(25);
    }
    throw new Error("no chat prompt within " + ms + " ms at " + page.url());
  };
  let t0;
  if (spec.clear_cookies) await ctx.clearCookies(); // a returning visitor's new session
  if (spec.mode === "lovd") {
    await page.goto(spec.base + "/", { waitUntil: "load" });
    await page.waitForTimeout(spec.read_ms ?? 2000);
    phase = "after";
    t0 = Date.now();
    await page.locator('form[action="/_lovd/start"] button').first().click();
  } else {
    phase = "after";
    t0 = Date.now();
    await page.goto(spec.url, { waitUntil: "commit" });
  }
  await waitChat(60000);
  result.click_to_prompt_ms = Date.now() - t0;
  result.chat_path = new URL(page.url()).pathname;
  await page.waitForTimeout(300); // late requests of the first paint
  const list = [...reqs.values()].filter((r) => r.phase === "after");
  const before = [...reqs.values()].filter((r) => r.phase === "before");
  const path = (r) => { try { return new URL(r.url).pathname; } catch { return r.url; } };
  const assets = list.filter((r) => path(r).startsWith("/assets/"));
  result.requests = list.length;
  result.bytes = list.reduce((a, r) => a + r.bytes, 0);
  result.bytes_before_click = before.reduce((a, r) => a + r.bytes, 0);
  result.asset_bytes = assets.reduce((a, r) => a + r.bytes, 0);
  result.assets = assets.length;
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
    await page.reload({ waitUntil: "commit" });
    await waitChat(60000);
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
