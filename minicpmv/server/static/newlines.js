// Escaped newlines for display: the JavaScript twin of minicpmv/newlines.py (same rules, same
// test cases in tests/data/newline_cases.json). A literal backslash-n becomes a newline, except
// inside fenced code, inline code, $...$, $$...$$, \(...\), \[...\], and never after an escaped
// backslash. The page runs it on the whole text so far, so it needs no streaming form.
"use strict";
(function (global) {
  const SPACE = " \t\n\r\f\v";
  const SPECIAL = "\n`~$\\";

  function run(s, i, c) {
    let j = i;
    while (j < s.length && s[j] === c) j++;
    return j - i;
  }

  function unescapeNewlines(s) {
    const out = [];
    let i = 0, lineStart = true, fence = null;
    const plain = (text, end) => { out.push(text); lineStart = false; return end; };
    while (i < s.length) {
      if (fence !== null) {
        const j = s.indexOf(fence, i);
        const end = j < 0 ? s.length : j + fence.length;
        out.push(s.slice(i, end));
        if (j >= 0) { fence = null; lineStart = false; }
        i = end;
        continue;
      }
      const c = s[i];
      if (c === "\n") { out.push(c); lineStart = true; i++; continue; }
      if (c === "\\") {
        if (i + 1 === s.length) { i = plain("\\", i + 1); continue; }
        const d = s[i + 1];
        if (d === "n") { out.push("\n"); lineStart = true; i += 2; continue; }
        if (d === "(" || d === "[") {
          const j = s.indexOf(d === "(" ? "\\)" : "\\]", i + 2);
          i = j >= 0 ? plain(s.slice(i, j + 2), j + 2) : plain(s.slice(i, i + 2), i + 2);
          continue;
        }
        i = plain(s.slice(i, i + 2), i + 2);
        continue;
      }
      if (c === "`" || c === "~") {
        const k = run(s, i, c);
        if (lineStart && k >= 3) { fence = c.repeat(k); i = plain(s.slice(i, i + k), i + k); continue; }
        if (c === "~") { i = plain(s.slice(i, i + k), i + k); continue; }
        let j = i + k, close = -1;
        while ((j = s.indexOf("`", j)) >= 0) {
          const m = run(s, j, "`");
          if (m === k) { close = j; break; }
          j += m;
        }
        i = close >= 0 ? plain(s.slice(i, close + k), close + k) : plain(s.slice(i, i + k), i + k);
        continue;
      }
      if (c === "$") {
        if (i + 1 === s.length) { i = plain("$", i + 1); continue; }
        if (s[i + 1] === "$") {
          const j = s.indexOf("$$", i + 2);
          i = j >= 0 ? plain(s.slice(i, j + 2), j + 2) : plain("$$", i + 2);
          continue;
        }
        let close = -1;
        if (!SPACE.includes(s[i + 1])) {
          for (let j = i + 1; j < s.length; j++) {
            const ch = s[j];
            if (ch === "\n") break;
            if (ch === "\\") { j++; continue; }
            if (ch === "$" && !SPACE.includes(s[j - 1]) && !(j + 1 < s.length && s[j + 1] >= "0" && s[j + 1] <= "9")) {
              close = j;
              break;
            }
          }
        }
        i = close >= 0 ? plain(s.slice(i, close + 1), close + 1) : plain("$", i + 1);
        continue;
      }
      let j = i;
      while (j < s.length && !SPECIAL.includes(s[j])) j++;
      const text = s.slice(i, j);
      out.push(text);
      lineStart = lineStart && text.replaceAll(" ", "") === "";
      i = j;
    }
    return out.join("");
  }

  global.unescapeNewlines = unescapeNewlines;
})(typeof window !== "undefined" ? window : globalThis);
