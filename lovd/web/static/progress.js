// The "starting / waking up" page: poll /_lovd/status and reload once the session is ready.
// Without JavaScript the page refreshes itself (<noscript> meta refresh).
(function () {
  "use strict";
  var status = document.getElementById("progress-status");
  var bar = document.getElementById("progress-bar");
  var started = Date.now();
  var timer = null;

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
      say(message + " Trying again in " + left + " s.");
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
          say("Your session is ready. Opening it…");
          if (bar) { bar.value = bar.max; }
          window.location.reload();
          return;
        }
        if (code >= 400 || body.error) {
          if (body.retry_after) { countdown(body.retry_after, body.message || "Not available yet."); }
          else { say(body.message || "Something went wrong."); }
          return;
        }
        var secs = Math.round((Date.now() - started) / 1000);
        say((body.message || "Starting…") + (secs >= 2 ? " (" + secs + " s)" : ""));
        schedule(400);
      })
      .catch(function () { schedule(1000); });
  }

  schedule(300);
})();
