-- The character corpus: reads a text file, maps its characters to token ids, and serves
-- windows of it as a dataset for ms.data.DataLoader.
local ffi = require "ffi"
local ms = require "moonshard"

local M = {}

local Corpus = {}
Corpus.__index = Corpus

-- Corpus.load(path) -> corpus with vocab (array of characters), size and ids (int32 array).
function M.load(path)
  local file, err = io.open(path, "rb")
  if not file then error("train: cannot read the corpus: " .. tostring(err), 0) end
  local text = file:read("*a")
  file:close()
  local seen = {}
  for i = 1, #text do seen[text:byte(i)] = true end
  local vocab, index = {}, {}
  for byte = 0, 255 do
    if seen[byte] then
      vocab[#vocab + 1] = string.char(byte)
      index[byte] = #vocab - 1
    end
  end
  local ids = ffi.new("int32_t[?]", #text)
  for i = 1, #text do ids[i - 1] = index[text:byte(i)] end
  return setmetatable({vocab = vocab, index = index, ids = ids, length = #text}, Corpus)
end

function Corpus:vocab_size() return #self.vocab end

function Corpus:encode(text)
  local out = {}
  for i = 1, #text do
    local id = self.index[text:byte(i)]
    if id == nil then error(("train: character %q is not in the corpus"):format(text:sub(i, i)), 0) end
    out[i] = id
  end
  return out
end

function Corpus:decode(ids)
  local chars = {}
  for i, id in ipairs(ids) do chars[i] = self.vocab[id + 1] end
  return table.concat(chars)
end

-- The corpus as a dataset for ms.data: item i is the start (i * seq) of the i-th window of
-- seq + 1 characters; collate turns a batch of starts into tokens and targets.
function Corpus:windows(seq)
  local count = math.floor((self.length - 1) / seq)
  if count < 1 then error(("train: the corpus (%d characters) is shorter than --seq %d"):format(self.length, seq), 0) end
  return {len = function() return count end, get = function(_, i) return i * seq end}
end

-- {tokens =, targets =}: the windows starting at starts and their next characters, both
-- i64 [#starts, seq].
function Corpus:collate(starts, seq)
  local rows = #starts
  local tokens = ms.empty(rows, seq, {dtype = "i64"})
  local targets = ms.empty(rows, seq, {dtype = "i64"})
  local tp = ffi.cast("int64_t *", tokens:data_ptr())
  local yp = ffi.cast("int64_t *", targets:data_ptr())
  for r = 0, rows - 1 do
    local start = starts[r + 1]
    for t = 0, seq - 1 do
      tp[r * seq + t] = self.ids[start + t]
      yp[r * seq + t] = self.ids[start + t + 1]
    end
  end
  return {tokens = tokens, targets = targets}
end

return M
