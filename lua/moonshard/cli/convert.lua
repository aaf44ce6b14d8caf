-- moonshard ckpt export / import: between a checkpoint store and a safetensors file, with
-- PyTorch's state-dict keys (the store's names without a prefix such as "model.").
local args = require "moonshard.cli.args"
local safetensors = require "moonshard.cli.safetensors"

local M = {}

local function dcp() return require("moonshard").dcp end

local function prefix_of(opts)
  local prefix = opts.prefix or "model."
  if prefix ~= "" and prefix:sub(-1) ~= "." then prefix = prefix .. "." end
  return prefix
end

function M.export(argv)
  local opts, positional = args.parse(argv, {["--step"] = "int", ["--prefix"] = "string"})
  local dir, path = positional[1], positional[2]
  if not dir or not path then args.usage_error("export needs a store directory and an output file") end
  local prefix = prefix_of(opts)
  local store = dcp().open(dir)
  local steps = store:steps()
  if #steps == 0 then error(dir .. " has no committed step", 0) end
  local step = opts.step or steps[#steps]
  local tensors = {}
  for _, e in ipairs(store:entries(step)) do
    if e.kind == "tensor" and e.fqn:sub(1, #prefix) == prefix then
      tensors[#tensors + 1] = {name = e.fqn:sub(#prefix + 1), tensor = store:read(e.fqn, step)}
    end
  end
  store:close()
  if #tensors == 0 then error(("step %d of %s has no tensor under prefix '%s'"):format(step, dir, prefix), 0) end
  local bytes = safetensors.write(path, tensors, {format = "pt", moonshard_step = tostring(step)})
  for _, entry in ipairs(tensors) do entry.tensor:free() end
  io.stdout:write(("wrote %d tensors (%d bytes) of step %d to %s\n"):format(#tensors, bytes, step, path))
end

function M.import(argv)
  local opts, positional = args.parse(argv, {["--step"] = "int", ["--prefix"] = "string"})
  local path, dir = positional[1], positional[2]
  if not path or not dir then args.usage_error("import needs a safetensors file and a store directory") end
  if opts.step and opts.step < 0 then args.usage_error("--step must be >= 0") end
  local probe = io.open(path .. "/.")
  if probe then
    probe:close()
    error(("%s is a directory, not a safetensors file"):format(path), 0)
  end
  local tensors = safetensors.read(path)
  local prefix = prefix_of(opts)
  local values = {}
  for _, entry in ipairs(tensors) do values[entry.name] = entry.tensor end
  local state = prefix == "" and values or {[prefix:sub(1, -2)] = values}
  local step = opts.step
  if step == nil then
    step = 0
    local ok, store = pcall(dcp().open, dir)
    if ok then
      local steps = store:steps()
      store:close()
      if #steps > 0 then
        -- Training resumes from the newest step: an import must not become it unasked.
        error(("%s holds steps up to %d; the import would become the newest step, which training " ..
               "resumes from: choose its step with --step N"):format(dir, steps[#steps]), 0)
      end
    end
  end
  dcp().save(state, dir, {step = step})
  for _, entry in ipairs(tensors) do entry.tensor:free() end
  io.stdout:write(("imported %d tensors from %s into %s as step %d\n"):format(#tensors, path, dir, step))
end

return M
