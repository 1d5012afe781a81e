-- Keep-alive mode: wrk's default requests, plus the JSON report of wrk_report.lua.
local here = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
dofile(here .. "wrk_report.lua")
