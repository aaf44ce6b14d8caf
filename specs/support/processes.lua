-- Separate processes for specs (not ranks of one job): fork children that run a Lua
-- function and report a string back through a file, wait for them, signal them.
local ffi = require "ffi"

pcall(ffi.cdef, [[
int fork(void);
int getpid(void);
int kill(int pid, int sig);
int waitpid(int pid, int *status, int options);
void _exit(int status);
int usleep(unsigned int usec);
]])

local M = {}

M.SIGKILL = 9

-- Fork a child running fn(); it exits 0 when fn returns (its result, a string, is written
-- to a file the parent reads), 1 when fn raises (the message is written instead).
-- Returns {pid =, path =}.
function M.start(fn)
  local path = os.tmpname()
  local pid = ffi.C.fork()
  assert(pid >= 0, "fork failed")
  if pid == 0 then
    local ok, result = pcall(fn)
    local f = io.open(path, "w")
    if f then
      f:write(tostring(result or ""))
      f:close()
    end
    io.stdout:flush()
    ffi.C._exit(ok and 0 or 1)
  end
  return {pid = pid, path = path}
end

-- Wait for a child: returns ok (exited 0), its report, and the raw wait status.
function M.wait(child)
  local status = ffi.new("int[1]")
  ffi.C.waitpid(child.pid, status, 0)
  local f = io.open(child.path)
  local report = f and f:read("*a") or ""
  if f then f:close() end
  os.remove(child.path)
  local raw = status[0]
  return raw == 0, report, raw
end

-- The signal that ended a child (0 when it exited), from a raw wait status.
function M.signal_of(raw) return bit.band(raw, 0x7f) end

function M.kill(child, signal) ffi.C.kill(child.pid, signal) end

function M.sleep(seconds) ffi.C.usleep(math.floor(seconds * 1e6)) end

-- Wait until path exists (a child's "ready" file), at most timeout seconds.
function M.wait_for_file(path, timeout)
  for _ = 1, math.ceil(timeout / 0.01) do
    local f = io.open(path)
    if f then f:close() return true end
    M.sleep(0.01)
  end
  return false
end

return M
