// The "starting / waking up" page: poll /_lovd/status and reload once the session is ready.
// Without JavaScript the page refreshes itself (<noscript> meta refresh). The texts come
// from the live region's data-* attributes, in the page's language (lovd/web/texts.py);
// /_lovd/status answers in the same language (the browser sends the same Accept-Language).
(function () {
  "use strict";
  var status = document.getElementById("progress-status");
  var bar = document.getElementById("progress-bar");
  var started = Date.now();
  var timer = null;
  var t = function (key) { return (status && status.getAttribute("data-" + key)) || ""; };

  function say(text) {
    if (status && status.textContent !== text) { status.textContent = text; }
  }

  function schedule(ms) {
    if (timer) { clearTimeout(timer); }
    timer = setTimeout(poll, ms);
  }

  function countdown(seconds, message) {
    var left = Math.max(1, Math.round(seconds));
    var tick = function () {
      say(message + " " + t("retry").replace("{s}", String(left)));
      if (left <= 0) { window.location.reload(); return; }
      left -= 1;
      timer = setTimeout(tick, 1000);
    };
    tick();
  }

  function poll() {
    fetch("/_lovd/status", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.json().then(function (body) { return [r.status, body]; }); })
      .then(function (res) {
        var code = res[0], body = res[1];
        if (body.ready) {
          say(t("ready"));
          if (bar) { bar.value = bar.max; }
          window.location.reload();
          return;
        }
        if (code >= 400 || body.error) {
          if (body.retry_after) { countdown(body.retry_after, body.message || t("not-yet")); }
          else { say(body.message || t("error")); }
          return;
        }
        var secs = Math.round((Date.now() - started) / 1000);
        say((body.message || t("default")) + (secs >= 2 ? " (" + secs + " s)" : ""));
        schedule(400);
      })
      .catch(function () { schedule(1000); });
  }

  schedule(300);
})();
