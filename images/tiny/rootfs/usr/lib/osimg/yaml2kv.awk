# Flatten the block-style YAML subset that osimg writes on a NoCloud drive into "path=value" lines:
#   hostname: "a"            -> hostname=a
#   users:\n  - name: "b"    -> users.0.name=b
#   runcmd:\n  - "echo x"    -> runcmd.0=echo x
# Scalars may be plain, single- or double-quoted (YAML/JSON escapes \" \\ \/ \n \t \r \b \f \uXXXX).
# Each output line holds one whole value: a backslash is written as \\, a newline as \n and a
# carriage return as \r, so a multi-line value (a file's content, a script) survives line-oriented
# tools; readers decode it with printf '%b'.
# Flow style, anchors and block scalars are not supported: osimg never emits them, and real
# cloud-init reads the rest.
function hexval(h,   i, n, d) {
  n = 0
  for (i = 1; i <= length(h); i++) {
    d = index("0123456789abcdef", tolower(substr(h, i, 1)))
    if (d == 0) return -1
    n = n * 16 + d - 1
  }
  return n
}
# one code point as UTF-8 bytes (NUL is dropped: it cannot live in a shell string)
function utf8(n) {
  if (n <= 0) return ""
  if (n < 128) return sprintf("%c", n)
  if (n < 2048) return sprintf("%c%c", 192 + int(n / 64), 128 + n % 64)
  return sprintf("%c%c%c", 224 + int(n / 4096), 128 + int(n / 64) % 64, 128 + n % 64)
}
function unq(s,   r, c, n) {
  sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s)
  if (s ~ /^".*"$/) {
    s = substr(s, 2, length(s) - 2)
    r = ""
    while (match(s, /\\./)) {
      c = substr(s, RSTART + 1, 1)
      r = r substr(s, 1, RSTART - 1)
      s = substr(s, RSTART + 2)
      if (c == "u" && (n = hexval(substr(s, 1, 4))) >= 0) { r = r utf8(n); s = substr(s, 5) }
      else r = r (c == "n" ? "\n" : c == "t" ? "\t" : c == "r" ? "\r" : c == "b" ? "\b" : c == "f" ? "\f" : c)
    }
    s = r s
  } else if (s ~ /^'.*'$/) {
    s = substr(s, 2, length(s) - 2); gsub(/''/, "'", s)
  }
  return s
}
# the escaping of the output lines, character by character: gsub treats backslashes in the
# replacement differently in busybox awk and in mawk/gawk
function enc(s,   r, i, c) {
  r = ""
  for (i = 1; i <= length(s); i++) {
    c = substr(s, i, 1)
    r = r (c == "\\" ? "\\\\" : c == "\n" ? "\\n" : c == "\r" ? "\\r" : c)
  }
  return r
}
function path(d,   p, k) { p = ""; for (k = 1; k <= d; k++) p = p (k > 1 ? "." : "") key[k]; return p }
function emit(d, v) { print path(d) "=" enc(v) }
# depth for an indentation column: pop deeper levels
function level(col,   d) { d = depth; while (d > 0 && ind[d] >= col) d--; return d }
BEGIN { depth = 0 }
/^[ \t]*#/ || /^[ \t]*$/ || /^---/ { next }
{
  line = $0
  sub(/\r$/, "", line)
  match(line, /^ */); col = RLENGTH; body = substr(line, col + 1)
  while (1) {
    if (body ~ /^- /) {
      d = level(col)
      # list item: index under the parent key at depth d
      ck = path(d); n = (ck in cnt) ? cnt[ck] + 1 : 0; cnt[ck] = n
      depth = d + 1; key[depth] = n; ind[depth] = col
      body = substr(body, 3); col += 2
      if (body ~ /^- /) continue
      if (body !~ /^[A-Za-z0-9_"'-][^:]*:( |$)/ || body ~ /^"/) { emit(depth, unq(body)); next }
      # "- key: value": a map item; its keys sit at col
      continue
    }
    if (match(body, /^[A-Za-z0-9_.-]+:( |$)/)) {
      k = substr(body, 1, RLENGTH); sub(/: ?$/, "", k); v = substr(body, RLENGTH + 1)
      d = level(col); depth = d + 1; key[depth] = k; ind[depth] = col
      if (v ~ /^[ \t]*$/) next
      emit(depth, unq(v)); next
    }
    next
  }
}
