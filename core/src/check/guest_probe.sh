# anyvm resource probe, run inside the guest by `sh -c SCRIPT anyvm-probe MODE ...`.
# Prints lines the host parses: "connected", "data HEX", "error TEXT", "rc N", "mounted",
# "readable", "writable", "empty_password USER". POSIX sh; uses bash's /dev/tcp when the guest
# has bash, else nc (busybox or traditional) with -e.
mode=$1; shift
d=$(mktemp -d 2>/dev/null || echo "/tmp/.anyvm-probe-$$")
mkdir -p "$d" || { echo "error cannot create a temporary directory"; exit 0; }
trap 'rm -rf "$d"' EXIT
case "$mode" in
tcp)
  host=$1; port=$2; secs=$3; want=$4   # want: bytes to read after connecting (0 = none)
  if command -v bash >/dev/null 2>&1; then
    timeout "$secs" bash -c 'exec 3<>"/dev/tcp/$0/$1" || exit 97; echo connected >&2
      [ "$2" -gt 0 ] && dd bs="$2" count=1 <&3 >"$3" 2>/dev/null; exit 0' \
      "$host" "$port" "$want" "$d/data" 2>"$d/err"
  elif command -v nc >/dev/null 2>&1; then
    printf '#!/bin/sh\necho connected >&2\n[ %s -gt 0 ] && dd bs=%s count=1 >"%s" 2>/dev/null\nexit 0\n' \
      "$want" "$want" "$d/data" >"$d/on"
    chmod +x "$d/on"
    timeout "$secs" nc -w "$secs" "$host" "$port" -e "$d/on" </dev/null 2>"$d/err"
  else
    echo "error the guest has neither bash nor nc to open a TCP connection"; exit 0
  fi
  echo "rc $?"
  grep -q '^connected$' "$d/err" && echo connected
  if [ -s "$d/data" ]; then printf 'data '; od -An -tx1 -v "$d/data" | tr -d ' \n'; echo; fi
  grep -v '^connected$' "$d/err" | head -n 3 | sed 's/^/error /'
  ;;
folder)
  path=$1
  if [ ! -d "$path" ]; then echo "error $path is not a directory in the guest"; exit 0; fi
  awk -v p="$path" '$2 == p { found = 1 } END { exit !found }' /proc/mounts && echo mounted
  ls "$path" >/dev/null 2>&1 && echo readable
  f="$path/.anyvm-check-$$"
  if (: >"$f") 2>/dev/null; then rm -f "$f"; echo writable; fi
  ;;
accounts)
  [ -r /etc/shadow ] || { echo "error /etc/shadow is not readable"; exit 0; }
  awk -F: '$2 == "" { print "empty_password " $1 }' /etc/shadow
  ;;
*)
  echo "error unknown probe mode $mode"
  ;;
esac
exit 0
