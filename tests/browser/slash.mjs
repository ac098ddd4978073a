// The "/" menu and a new chat's title as a person sees them, in Debian's Chromium
// (playwright-core) through lovd behind a real Caddy. Used by
// tests/browser/test_slash_menu.py.
//
//   node slash.mjs SPEC_JSON
//
// SPEC: {base, profile, artifacts, question}
//   open BASE/ → click start → the chat (made by lovd before the claim) → read the page's
//   text (the chat's title) →
//   type "/" → the menu's entries → Escape → ask QUESTION → wait for the answer and the
//   chat's new title → read the text again → type "/" again → pick "/undo".
// Prints one JSON line: {ok, slash, slash_after: [entry text] before and after the
// question, before, after: page text, undo: {status, body} of the revert request,
// undone, prompt_after_undo: page and prompt text after it, failed: [[status, method,
// path] of each 4xx/5xx on the way], error?}.
import { chromium } from "playwright-core";
import path from "node:path";

const spec = JSON.parse(process.argv[2]);
const result = { ok: false, slash: [], before: "", after: "", failed: [] };
const ctx = await chromium.launchPersistentContext(spec.profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  locale: "nb-NO",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"],
  viewport: { width: 1280, height: 800 },
});
const page = ctx.pages()[0] || (await ctx.newPage());
const shot = (what) => page.screenshot({ path: path.join(spec.artifacts, `slash-${what}.png`) });
page.on("response", (r) => {
  if (r.status() >= 400 && new URL(r.url()).origin === new URL(spec.base).origin) {
    result.failed.push([r.status(), r.request().method(), new URL(r.url()).pathname]);
  }
});
try {
  await page.goto(spec.base + "/", { waitUntil: "load" });
  await page.locator('form[action="/_lovd/start"] button').first().click();
  const prompt = page.locator('[data-component="prompt-input"]').first();
  await prompt.waitFor({ state: "visible", timeout: 60000 });
  await page.waitForTimeout(1500); // the chat list and the command list arrive
  result.before = await page.evaluate(() => document.body.innerText);
  await shot("before");

  await prompt.click();
  await page.keyboard.type("/");
  // The UI's own "/new" is always offered: once it shows, the menu is complete.
  await page.getByText("/new", { exact: true }).first().waitFor({ state: "visible", timeout: 10000 });
  await page.waitForTimeout(300);
  // Each entry is a line "/<trigger> <description> <keys>" (the 1.18.33 tabbed layout
  // sets no data attribute on them); the prompt's own "/" is a line of its own.
  const lines = (await page.evaluate(() => document.body.innerText)).split("\n");
  result.slash = lines.map((l) => l.trim()).filter((l) => /^\/[a-z][a-z-]*(\s|$)/.test(l));
  await shot("menu");
  await page.keyboard.press("Escape");
  await page.keyboard.press("Backspace");

  await prompt.click();
  await page.keyboard.type(spec.question);
  await page.keyboard.press("Enter");
  const end = Date.now() + 90000;
  while (Date.now() < end) {
    const text = await page.evaluate(() => document.body.innerText);
    if (text.includes("lovdata.no") && !text.includes("Ny samtale")) break;
    await page.waitForTimeout(250);
  }
  result.after = await page.evaluate(() => document.body.innerText);
  await shot("after");
  // The menu once the chat has messages (the UI adds /undo, /compact, /fork then).
  await prompt.click();
  await page.keyboard.type("/");
  await page.getByText("/new", { exact: true }).first().waitFor({ state: "visible", timeout: 10000 });
  await page.waitForTimeout(300);
  result.slash_after = (await page.evaluate(() => document.body.innerText)).split("\n")
    .map((l) => l.trim()).filter((l) => /^\/[a-z][a-z-]*(\s|$)/.test(l));
  await shot("menu-after");
  // "/undo" from the menu: the UI reverts the chat to before the question (POST
  // /session/{id}/revert, its body checked by lovd) and puts the question back in the prompt.
  const reverted = page.waitForResponse(
    (r) => r.request().method() === "POST" && new URL(r.url()).pathname.endsWith("/revert"),
    { timeout: 20000 });
  await page.keyboard.type("undo");
  await page.waitForTimeout(300);
  await page.keyboard.press("Enter");
  const r = await reverted;
  result.undo = { status: r.status(), body: (await r.text()).slice(0, 2000) };
  await page.waitForTimeout(1000);
  result.undone = await page.evaluate(() => document.body.innerText);
  result.prompt_after_undo = await prompt.innerText();
  await shot("undo");
  result.ok = true;
} catch (e) {
  result.error = String(e && e.stack ? e.stack : e);
  await shot("error").catch(() => {});
} finally {
  await ctx.close();
}
console.log(JSON.stringify(result));
