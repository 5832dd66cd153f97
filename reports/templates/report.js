/* zsad-bench report: sortable tables, metric switches, state in the URL fragment.
 *
 * Fragment commands (joined with "&"), e.g. index.html#sort=tbl-dataset-mvtec:2:desc&main=1
 *   sort=<table id>:<column index>:<asc|desc>   sort a table as if its header were clicked
 *   cat=<details id>:<per-category table slug>  open a per-category block and show that metric
 *   main=1                                      show only the main metrics
 * After set-up <html data-js-ready="1">; after load, data-broken-images counts images that
 * failed to decode (the browser test reads both).
 */
(function () {
  "use strict";

  function cellValue(td, type) {
    var v = td ? td.getAttribute("data-v") : null;
    if (type === "num") {
      var x = parseFloat(v);
      return isNaN(x) ? null : x;
    }
    return v === null ? (td ? td.textContent : "") : v;
  }

  function sortTable(table, col, dir) {
    var th = table.querySelector('thead tr:last-child th[data-col="' + col + '"]');
    if (!th) { return false; }
    var type = th.getAttribute("data-type") || "text";
    var tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.forEach(function (r, i) { r._i = i; });
    rows.sort(function (a, b) {
      var x = cellValue(a.cells[col], type), y = cellValue(b.cells[col], type);
      if (x === null && y === null) { return a._i - b._i; }
      if (x === null) { return 1; }   /* undefined values always last */
      if (y === null) { return -1; }
      var c = type === "num" ? x - y : String(x).localeCompare(String(y));
      if (c === 0) { return a._i - b._i; }
      return dir === "asc" ? c : -c;
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
    Array.prototype.forEach.call(table.querySelectorAll("thead th[data-sorted]"), function (h) {
      h.removeAttribute("data-sorted");
    });
    th.setAttribute("data-sorted", dir);
    table.setAttribute("data-sorted-by", col + ":" + dir);
    return true;
  }

  function showCategoryTable(details, slug) {
    if (!details) { return; }
    details.open = true;
    Array.prototype.forEach.call(details.querySelectorAll(".cat-table"), function (div) {
      div.hidden = div.getAttribute("data-table") !== slug;
    });
    var sel = details.querySelector("select.cat-switch");
    if (sel) { sel.value = slug; }
    details.setAttribute("data-shown", slug);
  }

  function setMainOnly(on) {
    document.body.classList.toggle("main-only", on);
    var box = document.getElementById("main-only");
    if (box) { box.checked = on; }
    Array.prototype.forEach.call(document.querySelectorAll("th.grp"), function (th) {
      var n = th.getAttribute(on ? "data-span-main" : "data-span");
      if (n && n !== "0") { th.colSpan = parseInt(n, 10); }
    });
  }

  function applyHash() {
    var h = decodeURIComponent((window.location.hash || "").replace(/^#/, ""));
    h.split("&").forEach(function (part) {
      var kv = part.split("="), key = kv[0], val = kv.slice(1).join("=");
      if (key === "sort" && val) {
        var p = val.split(":");
        var t = document.getElementById(p[0]);
        if (t) { sortTable(t, parseInt(p[1], 10), p[2] === "asc" ? "asc" : "desc"); }
      } else if (key === "cat" && val) {
        var q = val.split(":");
        showCategoryTable(document.getElementById(q[0]), q[1]);
      } else if (key === "main") {
        setMainOnly(val === "1");
      }
    });
  }

  function init() {
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
      Array.prototype.forEach.call(table.querySelectorAll("thead tr:last-child th[data-col]"), function (th) {
        th.addEventListener("click", function () {
          var col = parseInt(th.getAttribute("data-col"), 10);
          var cur = th.getAttribute("data-sorted");
          var first = th.getAttribute("data-type") === "num" ? "desc" : "asc";
          var dir = cur ? (cur === "desc" ? "asc" : "desc") : first;
          sortTable(table, col, dir);
        });
      });
    });
    Array.prototype.forEach.call(document.querySelectorAll("select.cat-switch"), function (sel) {
      sel.addEventListener("change", function () {
        showCategoryTable(document.getElementById(sel.getAttribute("data-target")), sel.value);
      });
    });
    var box = document.getElementById("main-only");
    if (box) { box.addEventListener("change", function () { setMainOnly(box.checked); }); }
    applyHash();
    window.addEventListener("hashchange", applyHash);
    document.documentElement.setAttribute("data-js-ready", "1");
  }

  function countBroken() {
    var broken = 0, imgs = document.images;
    for (var i = 0; i < imgs.length; i++) {
      if (!imgs[i].complete || imgs[i].naturalWidth === 0) { broken++; }
    }
    document.documentElement.setAttribute("data-images", String(imgs.length));
    document.documentElement.setAttribute("data-broken-images", String(broken));
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
  window.addEventListener("load", countBroken);
})();
