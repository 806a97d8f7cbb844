// Times are written in UTC by the server; the browser adds the reader's own local time.
(function () {
  "use strict";
  function addLocal() {
    document.querySelectorAll("time[data-local-time]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (isNaN(when) || el.nextElementSibling && el.nextElementSibling.classList.contains("local-time")) return;
      var local = document.createElement("span");
      local.className = "local-time";
      local.textContent = " (" + when.toLocaleString([], {dateStyle: "medium", timeStyle: "short"}) + " your time)";
      el.after(local);
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", addLocal);
  else addLocal();
})();
