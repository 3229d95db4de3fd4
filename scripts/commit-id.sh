# Sourced by the GPU scripts: commit_id prints the commit the results belong to: NOSA_COMMIT when
# set (a machine that got a copy of the tree without its history), else HEAD, with "-dirty" when
# tracked files differ from it.
commit_id() {
  if [ -n "${NOSA_COMMIT:-}" ]; then
    echo "$NOSA_COMMIT"
    return
  fi
  local c
  c=$(git rev-parse HEAD 2>/dev/null) || { echo unknown; return; }
  [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && c="$c-dirty"
  echo "$c"
}
