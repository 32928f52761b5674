# Flatten the block-style YAML subset that osimg writes on a NoCloud drive into "path=value" lines:
#   hostname: "a"            -> hostname=a
#   users:\n  - name: "b"    -> users.0.name=b
#   runcmd:\n  - "echo x"    -> runcmd.0=echo x
# Scalars may be plain or double-quoted (JSON escapes \" \\ \n \t). Flow style, anchors and
# multi-line scalars are not supported: osimg never emits them, and real cloud-init reads the rest.
function unq(s,   r) {
  sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s)
  if (s ~ /^".*"$/) {
    s = substr(s, 2, length(s) - 2)
    r = ""
    while (match(s, /\\./)) {
      c = substr(s, RSTART + 1, 1)
      r = r substr(s, 1, RSTART - 1) (c == "n" ? "\n" : c == "t" ? "\t" : c)
      s = substr(s, RSTART + 2)
    }
    s = r s
  } else if (s ~ /^'.*'$/) {
    s = substr(s, 2, length(s) - 2); gsub(/''/, "'", s)
  }
  return s
}
function path(d,   p, k) { p = ""; for (k = 1; k <= d; k++) p = p (k > 1 ? "." : "") key[k]; return p }
function emit(d, v) { print path(d) "=" v }
# depth for an indentation column: pop deeper levels
function level(col,   d) { d = depth; while (d > 0 && ind[d] >= col) d--; return d }
BEGIN { depth = 0 }
/^[ \t]*#/ || /^[ \t]*$/ || /^---/ { next }
{
  line = $0
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
