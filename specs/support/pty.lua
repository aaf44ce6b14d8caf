-- A command on a pseudo-terminal, driven as a person at a terminal would: keystrokes in
-- (Ctrl-C becomes a real SIGINT through the terminal's line discipline), screen text out.
local ffi = require "ffi"

local function declare(name, declaration)
  if not pcall(function() return ffi.C[name] end) then ffi.cdef(declaration) end
end
declare("posix_openpt", "int posix_openpt(int flags);")
declare("grantpt", "int grantpt(int fd);")
declare("unlockpt", "int unlockpt(int fd);")
declare("ptsname", "char *ptsname(int fd);")
declare("fork", "int fork(void);")
declare("setsid", "int setsid(void);")
declare("open", "int open(const char *path, int flags, ...);")
declare("ioctl", "int ioctl(int fd, unsigned long request, ...);")
declare("dup2", "int dup2(int from, int to);")
declare("close", "int close(int fd);")
declare("execvp", "int execvp(const char *file, char *const argv[]);")
declare("_exit", "void _exit(int status);")
declare("read", "long read(int fd, void *buf, unsigned long n);")
declare("write", "long write(int fd, const void *buf, unsigned long n);")
declare("poll", "int poll(void *fds, unsigned long nfds, int timeout);")
declare("waitpid", "int waitpid(int pid, int *status, int options);")
declare("kill", "int kill(int pid, int sig);")
if not pcall(ffi.typeof, "struct moonshard_pollfd") then
  ffi.cdef [[
struct moonshard_pollfd { int fd; short events, revents; };
struct moonshard_winsize { unsigned short rows, cols, xpixel, ypixel; };
]]
end

local O_RDWR, O_NOCTTY, TIOCSCTTY, TIOCSWINSZ, POLLIN, WNOHANG = 2, 256, 0x540E, 0x5414, 1, 1
local SIGKILL = 9

local M = {}
local Terminal = {}
Terminal.__index = Terminal

local function sleep_ms(ms) ffi.C.poll(nil, 0, ms) end

-- Start argv (an array; the first is looked up in PATH) on a new terminal of 80x24, in
-- its own session, with env (a table of NAME = value) added to the environment.
function M.spawn(argv, env)
  local master = ffi.C.posix_openpt(O_RDWR + O_NOCTTY)
  assert(master >= 0 and ffi.C.grantpt(master) == 0 and ffi.C.unlockpt(master) == 0, "no pty")
  local slave_name = ffi.string(ffi.C.ptsname(master))
  local full = {"env"}
  for name, value in pairs(env or {}) do full[#full + 1] = name .. "=" .. value end
  for _, a in ipairs(argv) do full[#full + 1] = a end
  local cargv = ffi.new("char *[?]", #full + 1)
  local keep = {}
  for i, a in ipairs(full) do
    keep[i] = ffi.new("char[?]", #a + 1, a)
    cargv[i - 1] = keep[i]
  end
  io.stdout:flush()
  local pid = ffi.C.fork()
  assert(pid >= 0, "fork failed")
  if pid == 0 then
    ffi.C.setsid()
    local slave = ffi.C.open(slave_name, O_RDWR)
    if slave < 0 then ffi.C._exit(126) end
    ffi.C.ioctl(slave, TIOCSCTTY, ffi.cast("int", 0))
    ffi.C.ioctl(slave, TIOCSWINSZ, ffi.new("struct moonshard_winsize", {24, 80, 0, 0}))
    for fd = 0, 2 do ffi.C.dup2(slave, fd) end
    ffi.C.close(slave)
    ffi.C.close(master)
    ffi.C.execvp("env", cargv)
    ffi.C._exit(127)
  end
  return setmetatable({pid = pid, master = master, text = "", status = nil}, Terminal)
end

-- Read what the program wrote, waiting up to ms for the first bytes.
function Terminal:pump(ms)
  local fds = ffi.new("struct moonshard_pollfd[1]", {{self.master, POLLIN, 0}})
  local buf = ffi.new("char[4096]")
  while ffi.C.poll(fds, 1, ms) > 0 do
    local n = ffi.C.read(self.master, buf, 4096)
    if n <= 0 then break end
    self.text = self.text .. ffi.string(buf, n):gsub("\r", ""):gsub("\27%[%?2004[hl]", "")
    ms = 0
  end
end

function Terminal:send(keys)
  local sent = ffi.C.write(self.master, keys, #keys)
  assert(sent == #keys, "the terminal took " .. tostring(sent) .. " of " .. #keys .. " bytes")
end

-- Wait until the screen text after position from (default 1) holds text; returns the
-- position just after it. Fails after seconds (default 20) with the screen so far.
function Terminal:expect(text, seconds, from)
  local deadline = os.time() + (seconds or 20)
  repeat
    local at = self.text:find(text, from or 1, true)
    if at then return at + #text end
    self:pump(100)
  until os.time() > deadline or self:exited()
  self:pump(100)
  local at = self.text:find(text, from or 1, true)
  if at then return at + #text end
  error(("the terminal never showed %q; it showed:\n%s"):format(text, self.text), 2)
end

-- True once the program has ended (self.status is then its wait status).
function Terminal:exited()
  if self.status then return true end
  local status = ffi.new("int[1]")
  if ffi.C.waitpid(self.pid, status, WNOHANG) == self.pid then
    self.status = status[0]
    return true
  end
  return false
end

-- Wait up to seconds for the program to end; returns "exit", code or "signal", number,
-- or nil when it is still running.
function Terminal:wait(seconds)
  local deadline = os.time() + seconds
  while not self:exited() and os.time() <= deadline do
    self:pump(50)
  end
  self:pump(0)
  if not self.status then return nil end
  local s = self.status
  if s % 128 == 0 then return "exit", math.floor(s / 256) % 256 end
  return "signal", s % 128
end

function Terminal:signal(sig) ffi.C.kill(self.pid, sig) end

-- CPU seconds the program has used so far (user + system).
function Terminal:cpu_seconds()
  local f = io.open("/proc/" .. self.pid .. "/stat")
  if not f then return 0 end
  local stat = f:read("*a")
  f:close()
  local fields = {}
  for field in stat:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = field end
  return (tonumber(fields[12]) + tonumber(fields[13])) / 100
end

-- End the program if it still runs and release the terminal.
function Terminal:close()
  if not self:exited() then
    self:signal(SIGKILL)
    ffi.C.waitpid(self.pid, nil, 0)
    self.status = SIGKILL
  end
  if self.master >= 0 then ffi.C.close(self.master) end
  self.master = -1
end

M.sleep_ms = sleep_ms

return M
