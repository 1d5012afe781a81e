-- Connection-per-request mode: every request says `Connection: close`, so the server answers
-- and closes, and wrk opens a new connection for the next one.
--   wrk -t1 -c64 -d5s -s benchmarks/close.lua http://127.0.0.1:8080/
wrk.headers["Connection"] = "close"
local here = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
dofile(here .. "wrk_report.lua")
