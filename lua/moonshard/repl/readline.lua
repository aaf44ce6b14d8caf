-- The REPL's line reader: GNU readline through the FFI on a terminal (emacs editing unless
-- the user's inputrc chooses vi, a history file, tab completion driven by a Lua function),
-- plain reads otherwise. Both wait in poll, so SIGINT and SIGTERM reach the REPL at once.
local ffi = require "ffi"
local lib = require("moonshard.ffi").lib

local M = {}

pcall(ffi.cdef, [[
typedef char *moonshard_rl_entry_fn(const char *text, int state);
typedef char **moonshard_rl_attempt_fn(const char *text, int start, int end);
typedef void moonshard_rl_line_fn(char *line);
typedef int moonshard_rl_command_fn(int count, int key);
typedef int moonshard_rl_getc_fn(void *stream);
extern moonshard_rl_getc_fn *rl_getc_function;
typedef struct { char type; moonshard_rl_command_fn *function; } moonshard_rl_keymap_entry;
void rl_callback_handler_install(const char *prompt, moonshard_rl_line_fn *handler);
void rl_callback_read_char(void);
void rl_callback_handler_remove(void);
void rl_callback_sigcleanup(void);
void rl_free_line_state(void);
void rl_cleanup_after_signal(void);
int rl_unbind_function_in_map(moonshard_rl_command_fn *function, moonshard_rl_keymap_entry *map);
int rl_vi_editing_mode(int count, int key);
extern moonshard_rl_keymap_entry emacs_meta_keymap[];
extern int rl_editing_mode;
extern int rl_catch_signals;
void add_history(const char *line);
int read_history(const char *filename);
int write_history(const char *filename);
int history_truncate_file(const char *filename, int lines);
char **rl_completion_matches(const char *text, moonshard_rl_entry_fn *entry);
extern moonshard_rl_attempt_fn *rl_attempted_completion_function;
extern int rl_attempted_completion_over;
extern const char *rl_readline_name;
extern const char *rl_basic_word_break_characters;
extern const char *rl_completer_quote_characters;
extern int rl_completion_append_character;
extern int rl_completion_suppress_quote;
]])
-- Each declaration once per LuaJIT state, whoever made it first (specs declare them too).
local function declare(name, declaration)
  if not pcall(function() return ffi.C[name] end) then ffi.cdef(declaration) end
end
declare("poll", "int poll(void *fds, unsigned long nfds, int timeout);")
declare("free", "void free(void *p);")
declare("strdup", "char *strdup(const char *s);")
declare("isatty", "int isatty(int fd);")
declare("read", "long read(int fd, void *buf, unsigned long n);")
declare("ioctl", "int ioctl(int fd, unsigned long request, ...);")
declare("open", "int open(const char *path, int flags, ...);")
pcall(ffi.cdef, "struct moonshard_repl_pollfd { int fd; short events, revents; };")

local HISTORY_LINES = 1000
local POLL_SLICE_MS = 100 -- a signal taken by another thread is noticed this late at most
local STDIN, POLLIN, FIONREAD, EMACS_MODE = 0, 1, 0x541B, 1
local O_NONBLOCK, O_CLOEXEC, EINTR, EAGAIN = 0x800, 0x80000, 4, 11
local SIGNAL_NAMES = {[2] = "SIGINT", [15] = "SIGTERM"}

local loaded, rl = pcall(ffi.load, "readline.so.8")
if not loaded then loaded, rl = pcall(ffi.load, "readline") end

-- Callbacks from readline into Lua live as long as the process (one of each).
local state = {complete = nil, matches = {}, index = 0, line = nil, done = false, keys_fd = -1}
local entry_callback, attempt_callback, line_callback, getc_callback

-- Strings handed to readline's globals must stay referenced while it may read them.
local READLINE_NAME = "moonshard"
-- Break words at spaces, operators and brackets, not at '.' or ':' so that paths such as
-- model.transformer.h complete as one word.
local WORD_BREAKS = " \t\n\"'`<>=;|&{}()[],+-*/%^~#"
-- A completion inside a string leaves the string open (the closing quote is typed).
local QUOTES = "\"'"

local function install_callbacks()
  entry_callback = ffi.cast("moonshard_rl_entry_fn *", function(_, iteration)
    if iteration == 0 then state.index = 0 end
    state.index = state.index + 1
    local match = state.matches[state.index]
    if match == nil then return nil end
    return ffi.C.strdup(match)
  end)
  attempt_callback = ffi.cast("moonshard_rl_attempt_fn *", function(text, start, stop)
    rl.rl_attempted_completion_over = 1
    rl.rl_completion_append_character = 0
    rl.rl_completion_suppress_quote = 1
    local ok, matches = pcall(state.complete, ffi.string(text), start, stop)
    state.matches = ok and matches or {}
    if #state.matches == 0 then return nil end
    return rl.rl_completion_matches(text, entry_callback)
  end)
  line_callback = ffi.cast("moonshard_rl_line_fn *", function(line)
    rl.rl_callback_handler_remove() -- or readline shows the prompt again at once
    state.done = true
    state.line = line ~= nil and ffi.string(line) or nil
    if line ~= nil then ffi.C.free(line) end
  end)
  -- Readline's keys come from a second, non-blocking open of the terminal: when Ctrl-C
  -- flushes the typed input between poll's "readable" and the read, a blocking read would
  -- wait for the next key (readline retries it after the signal). Here the wait goes back
  -- to poll, and a pending signal ends the key with EOF, which terminal_reader takes for it.
  state.keys_fd = ffi.C.open("/proc/self/fd/0", O_NONBLOCK + O_CLOEXEC)
  if state.keys_fd >= 0 then
    local byte = ffi.new("unsigned char[1]")
    getc_callback = ffi.cast("moonshard_rl_getc_fn *", function()
      local fds = ffi.new("struct moonshard_repl_pollfd[1]")
      while lib.ms_interrupt_pending() == 0 do
        local n = ffi.C.read(state.keys_fd, byte, 1)
        if n == 1 then return byte[0] end
        local errno = n < 0 and ffi.errno() or 0
        if errno ~= EAGAIN and errno ~= EINTR then return -1 end
        fds[0].fd, fds[0].events, fds[0].revents = state.keys_fd, POLLIN, 0
        ffi.C.poll(fds, 1, POLL_SLICE_MS)
      end
      return -1
    end)
    rl.rl_getc_function = getc_callback
  end
  rl.rl_attempted_completion_function = attempt_callback
  rl.rl_readline_name = READLINE_NAME
  rl.rl_basic_word_break_characters = WORD_BREAKS
  rl.rl_completer_quote_characters = QUOTES
  rl.rl_catch_signals = 0 -- SIGINT and SIGTERM stay moonshard's (ms_interrupt_*, ms.h)
end

-- Bytes a read of stdin returns at once (0 when it would wait or is at its end).
local function bytes_waiting()
  local count = ffi.new("int[1]")
  if ffi.C.ioctl(STDIN, FIONREAD, count) ~= 0 then return 0 end
  return count[0]
end

-- Wait until stdin has input (true) or a signal is pending (false, its name). A terminal
-- drops its typed input when it turns Ctrl-C into SIGINT, so "readable" is checked again
-- by counting bytes (a read would wait otherwise), except at a hang-up or error.
local function wait_for_input(counted)
  local fds = ffi.new("struct moonshard_repl_pollfd[1]")
  while true do
    local sig = lib.ms_interrupt_pending()
    if sig ~= 0 then
      lib.ms_interrupt_take()
      return false, SIGNAL_NAMES[sig] or "a signal"
    end
    fds[0].fd, fds[0].events, fds[0].revents = STDIN, POLLIN, 0
    if ffi.C.poll(fds, 1, POLL_SLICE_MS) > 0 then
      if not counted or fds[0].revents ~= POLLIN or bytes_waiting() > 0 then return true end
      ffi.C.poll(nil, 0, 10) -- readable yet empty: a signal on its way
    end
  end
end

-- Lines from a pipe or file, read with read(2) so that waiting can see signals.
local function plain_reader()
  local pending, ended = "", false
  local buf = ffi.new("char[4096]")
  return function(prompt)
    io.stdout:write(prompt)
    io.stdout:flush()
    while true do
      local newline = pending:find("\n", 1, true)
      if newline then
        local line = pending:sub(1, newline - 1)
        pending = pending:sub(newline + 1)
        return line
      end
      if ended then
        if pending == "" then return nil end
        local line = pending
        pending = ""
        return line
      end
      local ready, sig = wait_for_input()
      if not ready then return nil, sig end
      local n = ffi.C.read(STDIN, buf, 4096)
      if n > 0 then pending = pending .. ffi.string(buf, n) else ended = n == 0 or ended end
      if n < 0 and ffi.errno() ~= 4 then ended = true end -- EINTR retries
    end
  end
end

-- Emacs editing unless the inputrc chose vi; in emacs mode Meta-Ctrl-J (ESC newline, easily
-- typed by accident or found in pasted bytes) no longer switches to vi mode.
local function settle_editing_mode()
  if rl.rl_editing_mode == EMACS_MODE then
    rl.rl_unbind_function_in_map(rl.rl_vi_editing_mode, rl.emacs_meta_keymap)
  end
end

-- Lines from a terminal through readline's callback interface.
local function terminal_reader()
  local configured = false
  return function(prompt)
    state.done, state.line = false, nil
    rl.rl_callback_handler_install(prompt, line_callback)
    if not configured then
      settle_editing_mode()
      configured = true
    end
    while not state.done do
      local ready, sig = wait_for_input(true)
      if not ready then
        rl.rl_free_line_state()
        rl.rl_callback_sigcleanup()
        rl.rl_cleanup_after_signal()
        rl.rl_callback_handler_remove()
        io.stdout:write(sig == "SIGINT" and "^C\n" or "\n")
        return nil, sig
      end
      rl.rl_callback_read_char()
    end
    local sig = lib.ms_interrupt_pending()
    if state.line == nil and sig ~= 0 then -- the EOF that a signal gave an empty line
      lib.ms_interrupt_take()
      io.stdout:write(sig == 2 and "^C\n" or "\n")
      return nil, SIGNAL_NAMES[sig] or "a signal"
    end
    local text = state.line
    if text and text:match("%S") then rl.add_history(text) end
    return text
  end
end

-- True when readline will edit the lines: it is installed and stdin and stdout are terminals.
function M.interactive()
  return loaded and ffi.C.isatty(0) == 1 and ffi.C.isatty(1) == 1
end

-- Open a line reader: {history = path or nil, complete = function(word) -> matches}.
-- reader.read(prompt) returns a line without its newline, nil at end of input, or nil and
-- "SIGINT" / "SIGTERM" when a signal came while waiting (the typed line is dropped).
function M.open(opts)
  lib.ms_interrupt_install()
  local reader = {history = opts.history, editing = M.interactive()}
  if reader.editing then
    state.complete = opts.complete
    if not line_callback then install_callbacks() end
    if reader.history then rl.read_history(reader.history) end
  end
  reader.read = reader.editing and terminal_reader() or plain_reader()
  -- readline calls back into Lua for completion and lines, which LuaJIT allows only from
  -- interpreted code.
  jit.off(reader.read)
  function reader.close()
    if reader.editing and reader.history then
      rl.write_history(reader.history)
      rl.history_truncate_file(reader.history, HISTORY_LINES)
    end
  end
  return reader
end

return M
