-- GNU readline through the FFI: line editing, a history file, and tab completion driven by
-- a Lua function. Falls back to plain io.read when libreadline is not installed.
local ffi = require "ffi"

local M = {}

pcall(ffi.cdef, [[
typedef char *moonshard_rl_entry_fn(const char *text, int state);
typedef char **moonshard_rl_attempt_fn(const char *text, int start, int end);
char *readline(const char *prompt);
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
void free(void *p);
char *strdup(const char *s);
]])

local HISTORY_LINES = 1000

local loaded, rl = pcall(ffi.load, "readline.so.8")
if not loaded then loaded, rl = pcall(ffi.load, "readline") end

-- Callbacks from readline into Lua live as long as the process (one of each).
local state = {complete = nil, matches = {}, index = 0}
local entry_callback, attempt_callback

-- Strings handed to readline's globals must stay referenced while it may read them.
local READLINE_NAME = "moonshard"
-- Break words at spaces, operators and brackets, not at '.' or ':' so that paths such as
-- model.transformer.h complete as one word.
local WORD_BREAKS = " \t\n\"'`<>=;|&{}()[],+-*/%^~#"
-- A completion inside a string leaves the string open (the closing quote is typed).
local QUOTES = "\"'"

local function install_completion()
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
  rl.rl_attempted_completion_function = attempt_callback
  rl.rl_readline_name = READLINE_NAME
  rl.rl_basic_word_break_characters = WORD_BREAKS
  rl.rl_completer_quote_characters = QUOTES
end

M.available = loaded

-- Open a line reader: {history = path or nil, complete = function(word) -> matches}.
function M.open(opts)
  local reader = {history = opts.history}
  if loaded then
    state.complete = opts.complete
    if not attempt_callback then install_completion() end
    if reader.history then rl.read_history(reader.history) end
  end
  -- One line without its newline, or nil at end of input.
  function reader.read(prompt)
    if not loaded then
      io.stdout:write(prompt)
      io.stdout:flush()
      return io.stdin:read("*l")
    end
    local line = rl.readline(prompt)
    if line == nil then return nil end
    local text = ffi.string(line)
    ffi.C.free(line)
    if text:match("%S") then rl.add_history(text) end
    return text
  end
  -- readline calls back into Lua for completion, which LuaJIT allows only from
  -- interpreted code.
  jit.off(reader.read)
  function reader.close()
    if loaded and reader.history then
      rl.write_history(reader.history)
      rl.history_truncate_file(reader.history, HISTORY_LINES)
    end
  end
  return reader
end

return M
