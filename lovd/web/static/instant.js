// The landing page's start button without a new page (issue 17).
//
// The page already holds the chat UI the next session runs: its entry module is
// fetched and compiled (<link rel="modulepreload">), its stylesheet loaded but switched
// off (media="not all"). A click then claims a session with a same-origin fetch of
// POST /_lovd/start (the same checks as the form; lovd answers JSON and sets the
// session cookie), moves the address to the session's chat (the route OpenCode's UI
// itself would move it to), turns this page into OpenCode's page (its root element,
// styles and theme) and runs the UI's entry module: no redirect, no HTML to load,
// nothing to compile after the click.
//
// Whenever that cannot work, the plain form post runs instead (no JavaScript at all, a
// failed fetch, a session on another UI version, no chat made yet): the old path.
(function () {
  "use strict";
  var me = document.currentScript;
  var form = document.querySelector('form[action="/_lovd/start"]');
  if (!me || !form || !window.fetch || !window.history || !history.replaceState) { return; }
  var version = me.getAttribute("data-version") || "";
  var entry = me.getAttribute("data-entry") || "";
  var icon = me.getAttribute("data-icon") || "";
  var serverScoped = me.getAttribute("data-route") === "server";
  // OpenCode's chat address: /<folder, base64url>/session/<chat id>.
  var CHAT = /^\/[A-Za-z0-9_-]+\/session\/ses_[A-Za-z0-9]+$/;
  var busy = false;

  form.addEventListener("submit", function (ev) {
    if (!entry) { return; }
    ev.preventDefault();
    if (busy) { return; }
    busy = true;
    var button = form.querySelector("button");
    if (button) { button.setAttribute("aria-busy", "true"); }
    fetch("/_lovd/start", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Accept": "application/json" },
    }).then(function (r) {
      var type = r.headers.get("Content-Type") || "";
      if (r.ok && type.indexOf("application/json") === 0) {
        return r.json().then(go);
      }
      if (type.indexOf("text/html") === 0) {
        return r.text().then(show); // a refusal: lovd's page, as the form would get it
      }
      form.submit();
    }).catch(function () {
      // Nothing came back (or it made no sense): the form does it the old way. A start
      // that did happen is found again by its cookie (a browser with a live session gets
      // it back, never a second one).
      form.submit();
    });
  });

  function go(answer) {
    var where = String(answer && answer.location || "/");
    if (!CHAT.test(where) || answer.ui_version !== version) {
      location.assign(where); // the gate lands it (or loads the session's own UI)
      return;
    }
    history.replaceState(null, "", serverScoped ? serverRoute(where) : where);
    become();
    import(entry).catch(function () { location.reload(); });
  }

  // The chat's address in OpenCode's newer layout (data-route="server": lovd found the
  // route in this UI's script): /server/<this origin, base64url>/session/<chat id>. That
  // UI sends /<folder>/session/<id> there itself once it runs (a second route and render
  // in the person's first second); landing there directly skips that hop.
  function serverRoute(where) {
    var key = btoa(location.origin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    return "/server/" + key + "/session/" + where.split("/").pop();
  }

  // This page becomes OpenCode's own (its index.html): head bits, theme, styles, root.
  function become() {
    var html = document.documentElement;
    var head = document.head;
    document.title = "OpenCode";
    var viewport = head.querySelector('meta[name="viewport"]');
    if (viewport) {
      viewport.setAttribute("content", "width=device-width, initial-scale=1, " +
        "interactive-widget=resizes-content, viewport-fit=cover");
    }
    var dark = theme(html);
    var color = document.createElement("meta");
    color.name = "theme-color";
    color.content = dark ? "#080808" : "#fafafa";
    head.appendChild(color);
    if (icon) {
      var link = document.createElement("link");
      link.rel = "icon";
      link.href = icon;
      head.appendChild(link);
    }
    var links = head.querySelectorAll('link[rel="stylesheet"]');
    for (var i = 0; i < links.length; i++) {
      if (links[i].hasAttribute("data-ui")) { links[i].media = "all"; } else { links[i].remove(); }
    }
    var root = document.createElement("div");
    root.id = "root";
    root.className = "flex flex-col h-dvh bg-v2-background-bg-deep p-px";
    document.body.className =
      "antialiased overscroll-none text-12-regular overflow-hidden bg-v2-background-bg-deep";
    document.body.replaceChildren(root);
  }

  // What OpenCode's page does before its UI runs: the theme and colour scheme the person
  // chose earlier (kept in this origin's localStorage), else its default theme.
  function theme(html) {
    var store = {};
    try { store = window.localStorage || {}; } catch (e) { store = {}; }
    var get = function (k) { try { return store.getItem(k); } catch (e) { return null; } };
    var id = get("opencode-theme-id") || "oc-2";
    if (id === "oc-1") {
      id = "oc-2";
      try {
        store.setItem("opencode-theme-id", id);
        store.removeItem("opencode-theme-css-light");
        store.removeItem("opencode-theme-css-dark");
      } catch (e) { /* private mode: nothing kept */ }
    }
    var scheme = get("opencode-color-scheme") || "system";
    var dark = scheme === "dark" ||
      (scheme === "system" && matchMedia("(prefers-color-scheme: dark)").matches);
    var mode = dark ? "dark" : "light";
    html.dataset.theme = id;
    html.dataset.colorScheme = mode;
    html.style.backgroundColor = dark ? "#080808" : "#fafafa";
    var css = id === "oc-2" ? null : get("opencode-theme-css-" + mode);
    if (css) {
      var style = document.createElement("style");
      style.id = "oc-theme-preload";
      style.textContent = ":root{color-scheme:" + mode + ";--text-mix-blend-mode:" +
        (dark ? "plus-lighter" : "multiply") + ";" + css + "}";
      document.head.appendChild(style);
    }
    return dark;
  }

  function show(page) {
    var doc = new DOMParser().parseFromString(page, "text/html");
    document.title = doc.title;
    document.body.replaceWith(document.adoptNode(doc.body));
    busy = false;
  }
})();
