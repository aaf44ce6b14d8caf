-- The character corpus: reads a text file, maps its characters to token ids, and cuts
-- deterministic training batches whose rows depend only on (seed, step, row).
local ffi = require "ffi"
local bit = require "bit"
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

-- A 32-bit integer hash (xorshift-multiply), so every rank and every resumed run draws
-- the same window for the same (seed, step, row).
local function mix(x)
  x = bit.bxor(x, bit.rshift(x, 16))
  x = bit.tobit(x * 0x45d9f3b)
  x = bit.bxor(x, bit.rshift(x, 16))
  x = bit.tobit(x * 0x45d9f3b)
  return bit.bxor(x, bit.rshift(x, 16))
end

local function window_start(seed, step, row, span)
  local h = mix(bit.bxor(mix(bit.bxor(mix(seed), step)), row))
  return (h % span + span) % span
end

-- Rows [first_row, first_row + rows) of global batch step: tokens and next-character
-- targets, both i64 [rows, seq].
function Corpus:batch(opts)
  local rows, seq = opts.rows, opts.seq
  local span = self.length - seq - 1
  if span < 1 then error(("train: the corpus (%d characters) is shorter than --seq %d"):format(self.length, seq), 0) end
  local tokens = ms.empty(rows, seq, {dtype = "i64"})
  local targets = ms.empty(rows, seq, {dtype = "i64"})
  local tp = ffi.cast("int64_t *", tokens:data_ptr())
  local yp = ffi.cast("int64_t *", targets:data_ptr())
  for r = 0, rows - 1 do
    local start = window_start(opts.seed, opts.step, opts.first_row + r, span)
    for t = 0, seq - 1 do
      tp[r * seq + t] = self.ids[start + t]
      yp[r * seq + t] = self.ids[start + t + 1]
    end
  end
  return tokens, targets
end

return M
