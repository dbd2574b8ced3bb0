#!/usr/bin/env bash
# Stop what `make demo` started, by PID (worker first, then the server).
cd "$(dirname "$0")/.."
for name in worker server; do
  pidfile=.demo/$name.pid
  if [ -f "$pidfile" ]; then
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
      echo "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
  fi
done
