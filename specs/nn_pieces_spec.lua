-- nn pieces a GPT fine-tune needs, against PyTorch: attn_mask (boolean and additive) in
-- scaled_dot_product_attention, cross_entropy with label_smoothing in the [N, C, d...] layout,
-- nn.utils.clip_grad_norm_ (2, inf, p) for plain models, norm_type = inf in
-- fsdp.clip_grad_norm_, and amsgrad in Adam / AdamW; gradient checks for the differentiable ones.
--
-- The reference numbers were computed by PyTorch 2.15 (CPU, f64, from PyPI into a virtualenv
-- outside the repository) on the inputs values(n, a, b)[i] = 1.5 sin(a i + b) built the same
-- way below: torch.nn.functional.cross_entropy(x[2,4,3], t, reduction=..., label_smoothing=0.15)
-- and (x[3,4], [3,0,2], label_smoothing=0.3) with backward of ones; scaled_dot_product_attention
-- with a bool mask [3,5] and with a float mask 0.8 * values [2,1,5] and scale=0.3, backward of
-- o.sum(); torch.nn.utils.clip_grad_norm_([a, b], 0.5, norm_type) for 2, inf and 3; and the
-- Adam / AdamW (amsgrad=True) trajectories of the objective in `objective` below.
local ms = require "moonshard"
local gradcheck = require "support.gradcheck"
local parity = require "support.parity"
local global_state = require "support.global_state"
local nn, F, optim, dist, fsdp = ms.nn, ms.nn.F, ms.optim, ms.dist, ms.fsdp

local pytorch = {
  ce_mean = {value = {1.8632743754913443}, grads = {{-0.15134663044736377, 0.037444521010592431, 0.064471713210719192, 0.084120213098878904, -0.075391507046086492, 0.087392821720609359, 0.060030211672007616, 0.036346638547830254, 0.019117308972896856, 0.0071962056764772516, 0.00160034748766387, -0.17098184390422544, -0.0010834640601264972, 0, -0.00087144547381632731, 0.0040775942503558709, 0, -0.14994770283752484, -0.1215156436579954, 0, 0.088386800877751429, 0.11852151346776603, 0, 0.06243234743358976}}},
  ce_sum = {value = {9.3163718774567208}, grads = {{-0.75673315223681881, 0.18722260505296209, 0.32235856605359603, 0.42060106549439447, -0.37695753523043257, 0.43696410860304685, 0.30015105836003803, 0.18173319273915123, 0.095586544864484285, 0.035981028382386246, 0.0080017374383193427, -0.85490921952112719, -0.0054173203006324909, 0, -0.004357227369081642, 0.020387971251779345, 0, -0.74973851418762427, -0.60757821828997705, 0, 0.44193400438875707, 0.59260756733883002, 0, 0.31216173716794876}}},
  ce_none = {value = {1.9733687461280942, 0.82541901942263185, 3.1804705243593809, 1.3831505972052147, 0, 1.9539629903414}, grads = {{-0.75673315223681881, 0.18722260505296209, 0.32235856605359603, 0.42060106549439447, -0.37695753523043257, 0.43696410860304685, 0.30015105836003803, 0.18173319273915123, 0.095586544864484285, 0.035981028382386246, 0.0080017374383193427, -0.85490921952112719, -0.0054173203006324909, 0, -0.004357227369081642, 0.020387971251779345, 0, -0.74973851418762427, -0.60757821828997705, 0, 0.44193400438875707, 0.59260756733883002, 0, 0.31216173716794876}}},
  ce_2d = {value = {2.005066903246175}, grads = {{0.024914212583922155, 0.10537950616925894, 0.090173097905187446, -0.22046681665836848, -0.21769748298770258, 0.0019288779400132659, 0.031235949287117253, 0.18453265576057215, 0.13316441355485875, 0.099746545889488114, -0.21959822529565243, -0.013312734148694407}}},
  sdpa_bool = {value = {0.5716270577191257, 1.3302716343204872, 1.4460275266413627, 0.8629526613548294, 0.077652598845715265, -0.33777481322604536, -0.58996368088660989, -0.55703711438082426, 0.27136815286652127, -0.20671842000840673, -0.58490289046525845, -0.68041768656260249, 1.3431692192677043, 0.64867798915467001, -0.35930390572952986, -1.1936427571541954, -0.55716363586652784, -0.45971549371456777, -0.14009777260403541, 0.2472258744063896, 0.18104834170434414, 0.38274869737009654, 0.39947569863667687, 0.22314558309135946}, grads = {{0.02480098603436633, 0.033741128780683687, 0.039863473979584348, 0.042656730814509256, -0.4096242172614214, -0.0011376958550164407, 0.40744383709088905, 0.78199881887049261, 0.22235975897348353, 0.30057977782499185, 0.35369770343404766, 0.37727753837217309, 0.078084197155834117, -0.0116784895762975, -0.10046587937928568, -0.18086313765009862, -0.2054423197203164, -0.13676023936027465, -0.056657003840951098, 0.028177785489293394, -0.58338308508433057, -0.18921705841190761, 0.22075091035285554, 0.61228347413085737}, {0.95909631779776039, 0.3903147680707259, -0.28556363456225742, -0.8830874140351439, -0.95445123328560622, -0.37472269957789478, 0.30782444392923342, 0.90590891297672904, -0.20102841976337626, -0.2067849365655498, -0.15580259092602916, -0.062070217545444124, 0.55371905398186516, 0.54996458046829066, 0.39530760313958563, 0.13218380956586495, -0.35733571873064313, -0.35877171239557237, -0.26176582158053319, -0.092935090962006764, 0.13574052562829991, -0.064438000684348129, -0.24693565082888136, -0.36167765031029764, -0.18175970931969498, -0.057152621549225693, 0.083136337377442929, 0.200613860961142, 0.034299827691882979, 0.11808139527228509, 0.16946309778246865, 0.17434652264381156, 1.2878962483027274, 1.2324121166316244, 0.83877152773292918, 0.21498389271725218, -1.2761768923032155, -1.228902889670336, -0.84443531206395972, -0.22826662601190836}, {1.2904731366469371, 1.2904731366469371, 1.2904731366469371, 1.2904731366469371, 0.69237817476506613, 0.69237817476506613, 0.69237817476506613, 0.69237817476506613, 0.076553227354032846, 0.076553227354032846, 0.076553227354032846, 0.076553227354032846, 0.72474875007216433, 0.72474875007216433, 0.72474875007216433, 0.72474875007216433, 0.21584671116179974, 0.21584671116179974, 0.21584671116179974, 0.21584671116179974, 1.2053216565385356, 1.2053216565385356, 1.2053216565385356, 1.2053216565385356, 0.67287707871845515, 0.67287707871845515, 0.67287707871845515, 0.67287707871845515, 0.1320891434516302, 0.1320891434516302, 0.1320891434516302, 0.1320891434516302, 0.38350950152002011, 0.38350950152002011, 0.38350950152002011, 0.38350950152002011, 0.60620261977135848, 0.60620261977135848, 0.60620261977135848, 0.60620261977135848}}},
  sdpa_float = {value = {0.20818905012531239, 0.32234371141270518, 0.28071731327605171, 0.1034269052253787, -0.01566796327880185, 0.044461540946568817, 0.083103838482139564, 0.081584024760086263, 0.17440057157781702, -0.090095468562798875, -0.31105050869287226, -0.38168222603745861, 0.047987120967510566, -0.090192071017889439, -0.18478357732070055, -0.19007356968043937, 0.22665670640023039, 0.1209054380004902, -0.043276556841216687, -0.18654401966552242, 0.22929968293322125, 0.2677446066891418, 0.17679492149701737, 0.00040444997500127533}, grads = {{-0.25621569843997477, -0.019904321980945671, 0.21806930917102638, 0.43783148188178783, -0.16060196729849766, -0.14399579574660587, -0.11536421144902718, -0.077098302402158189, 0.28608136765198661, 0.29384060715318189, 0.2770605567109512, 0.23714255607563284, -0.14664019260855271, -0.13057322216115977, -0.10360178827522751, -0.067978336052640059, -0.035717130230670684, -0.032374146893781118, -0.026327525741156897, -0.018082233703952521, -0.29931325495698807, -0.12721177106096238, 0.055513453932408377, 0.23360262553953431}, {0.30730345668046471, 0.55688450677028867, 0.65366432312259604, 0.57108789269655391, -0.52322154538371368, -0.66523288269637992, -0.6247137240749927, -0.4127819536626427, 0.052778791029581426, -0.11642567230670919, -0.25368457754090795, -0.32133602205898198, 0.28492233378289838, 0.35963737401710427, 0.33567300446373993, 0.21960470924739142, -0.12178303610923086, -0.13486332578430391, -0.11093902597043527, -0.056574626222320699, 0.068419438347468872, 0.12152328203482077, 0.14128285559613665, 0.12227641146690464, -0.1430149201204492, -0.15914004422692338, -0.13159939060159298, -0.06794972514605345, 0.14179367705516988, 0.054099792757511117, -0.048438309646042593, -0.13768562485028843, 0.44937560299732016, 0.54529063636195452, 0.49158563007985634, 0.30299647843075189, -0.51657379827950956, -0.56177366692736297, -0.45283078542835747, -0.21963753990131468}, {0.68413467985148868, 0.68413467985148868, 0.68413467985148868, 0.68413467985148868, 0.6928561176739757, 0.6928561176739757, 0.6928561176739757, 0.6928561176739757, 0.53755198102739477, 0.53755198102739477, 0.53755198102739477, 0.53755198102739477, 0.7783402482931161, 0.7783402482931161, 0.7783402482931161, 0.7783402482931161, 0.30711697315402497, 0.30711697315402497, 0.30711697315402497, 0.30711697315402497, 0.8664157363315883, 0.8664157363315883, 0.8664157363315883, 0.8664157363315883, 0.72725598989443296, 0.72725598989443296, 0.72725598989443296, 0.72725598989443296, 0.36411634618185018, 0.36411634618185018, 0.36411634618185018, 0.36411634618185018, 0.51778162718067544, 0.51778162718067544, 0.51778162718067544, 0.51778162718067544, 0.52443030041145322, 0.52443030041145322, 0.52443030041145322, 0.52443030041145322}, {2.408717425343383, -3.0995903799353308, 1.7321530032017902, -1.4504253340565043, 0.40914528544666251, 0.23930513077681415, -0.90826346532902213, 0.88344536068865143, -2.0438510617438403, 1.8293640356073975}}},
  clip_2 = {value = {4.7431959506930079}, grads = {{0.075807342113554263, 0.14162895221162716, 0.15636443778603043, 0.11469865077405811, 0.0316606057269848, -0.062797545318237447}, {0.062827666506458629, 0.31545021120986177, 0.10593745746957471, -0.25877391964870528}}},
  clip_inf = {value = {2.9924849598121632}, grads = {{0.12015734034579136, 0.2244869393813973, 0.24784320944652991, 0.1818014513372232, 0.050183189013442896, -0.099536348529156146}, {0.099584091686531206, 0.4999998329148384, 0.16791464754788607, -0.41016588985889857}}},
  clip_3 = {value = {3.6939566712680931}, grads = {{0.097339814354103382, 0.181857528981761, 0.20077851196625116, 0.14727788973644426, 0.040653548823632132, -0.08063468831309524}, {0.080673365185121484, 0.40505133330140153, 0.13602814919678291, -0.33227659216118155}}},
}

local amsgrad_pytorch = {
  adam = {
    {0.75000000042372883, -1.2500000001057083, 1.2345678784830838e-09, 2.0500000004761905, -0.4499999988636364, 1.6500000000675676},
    {0.70326849198856645, -1.2034376343936635, -0.037811297553465087, 2.0022831324460744, -0.49372025246689782, 1.6034506858515924},
    {0.66062826888179149, -1.1612667905736898, -0.064158591957448649, 1.9572568320381829, -0.52940612741038484, 1.561321324811962},
    {0.62208326373757439, -1.1235518654616017, -0.082657051413416935, 1.9148096115013342, -0.55722846357959233, 1.5236853342854777},
    {0.58725475535668059, -1.0899126733927305, -0.096058342961575477, 1.8746196035693716, -0.57810968767316273, 1.4901642683748291},
    {0.5556601420281212, -1.0598317949840752, -0.10603929555245274, 1.8363270346530784, -0.59305894598448405, 1.4602379320887204},
    {0.52683864825953519, -1.0328023299775899, -0.1135828554491634, 1.7996058915536994, -0.60295698129148478, 1.4333963425119625},
    {0.50039264464547395, -1.0083823171285595, -0.11927396044357637, 1.7641842637791016, -0.60852688463128779, 1.4091916185124973},
  },
  adamw = {
    {0.74600000045454551, -1.2435000001086958, -0.00024999875000002864, 2.0395000005952384, -0.44799999895833337, 1.6415000000691564},
    {0.69624867862268369, -1.1911601227228714, -0.035594303464623299, 1.9831147201124439, -0.49058844668778262, 1.5871599342960974},
    {0.65313271722439892, -1.1453320422129309, -0.057934340460371762, 1.93317212828925, -0.52511975900814134, 1.5393283136280698},
    {0.6171373852204447, -1.1065865882819921, -0.07198779653886174, 1.8902989487984738, -0.55206006992181511, 1.4985848237974382},
    {0.58748261272573088, -1.0741958487121686, -0.081062437015431532, 1.8538013767435644, -0.5727476916144183, 1.464206697608289},
    {0.56313146070034348, -1.0471482309927169, -0.087128008312530356, 1.8226843605304544, -0.58847942359187955, 1.4351846155094259},
    {0.54310468972280612, -1.0244736313602121, -0.091315080614977631, 1.7959837028162866, -0.60032111891807649, 1.4105491007190771},
    {0.52656617890771296, -1.0053365853355281, -0.094276890566655017, 1.7728642881009842, -0.60910819127745008, 1.3894645214272674},
  },
  adam_max = {
    {0.84999999954545458, -1.3499999998913044, 0.099999998750000027, 2.1499999994047618, -0.35000000104166668, 1.7499999999308438},
    {0.89693094250447514, -1.3968420906359924, 0.14971585597611189, 2.1967802613029725, -0.30219356081330639, 1.7968268466899027},
    {0.93968868711534304, -1.4394277381671854, 0.19808193908518668, 2.2392462704531813, -0.25772911359218065, 1.8393829881624579},
    {0.97796289475572462, -1.4774780507067655, 0.24398046199250001, 2.2771411889128368, -0.21721038785995159, 1.8773949570372617},
    {1.0119445219902581, -1.5112150007694065, 0.28661287868039753, 2.3107085650835639, -0.1807520316560785, 1.9110900460194846},
    {1.0420494845192301, -1.5410745136408248, 0.32560259547033699, 2.3403980309527315, -0.14815500126562151, 1.9409075637509432},
    {1.0687398786396847, -1.5675310925069685, 0.36092002825358682, 2.3666927590296618, -0.11907686317176494, 1.9673241621616384},
    {1.092463363933484, -1.5910378302779005, 0.39274815883168979, 2.390049535454799, -0.09313232410175859, 1.9907938511622287},
  },
}

local function values(n, a, b)
  local out = {}
  for i = 0, n - 1 do out[i + 1] = math.sin(a * i + b) * 1.5 end
  return out
end

local function f64(shape, flat, requires_grad)
  local t = ms.tensor(flat, {dtype = "f64"}):view(shape)
  if requires_grad then t:requires_grad_(true) end
  return t
end

local function flat_of(list)
  local out = {}
  for _, t in ipairs(list) do
    for _, v in ipairs(gradcheck.flat(t)) do out[#out + 1] = v end
  end
  return out
end

local function assert_close(expected, got, tolerance, what)
  assert.are.equal(#expected, #got, what .. ": sizes differ")
  for i, v in ipairs(expected) do
    local err = math.abs(got[i] - v) / math.max(1, math.abs(v))
    assert.is_true(err <= tolerance, ("%s element %d: got %.17g, PyTorch %.17g"):format(what, i - 1, got[i], v))
  end
end

local function check_grad(fn, inputs)
  local ok, problem = gradcheck.check(fn, inputs)
  assert.is_true(ok, problem)
end

local targets = function() return ms.tensor({{0, 1, 3}, {2, -100, 1}}, {dtype = "i64"}) end

before_each(global_state.save)
after_each(global_state.restore)

describe("cross_entropy", function()
  for _, reduction in ipairs({"mean", "sum", "none"}) do
    it("with label_smoothing in the [N, C, d] layout equals PyTorch's (reduction " .. reduction .. ")", function()
      local x = f64({2, 4, 3}, values(24, 0.37, 0.1), true)
      local loss = F.cross_entropy(x, targets(), {reduction = reduction, label_smoothing = 0.15})
      loss:backward(ms.ones_like(loss))
      local ref = pytorch["ce_" .. reduction]
      if reduction == "none" then assert.are.equal("[2, 3]", tostring(loss:shape())) end
      assert_close(ref.value, gradcheck.flat(loss), 1e-12, "loss")
      assert_close(ref.grads[1], gradcheck.flat(x.grad), 1e-12, "input gradient")
    end)
  end

  it("with label_smoothing on [N, C] equals PyTorch's", function()
    local x = f64({3, 4}, values(12, 0.91, 0.3), true)
    local loss = F.cross_entropy(x, ms.tensor({3, 0, 2}, {dtype = "i64"}), {label_smoothing = 0.3})
    loss:backward()
    assert_close(pytorch.ce_2d.value, {loss:item()}, 1e-12, "loss")
    assert_close(pytorch.ce_2d.grads[1], gradcheck.flat(x.grad), 1e-12, "input gradient")
  end)

  -- PyTorch 2.15: every target ignore_index, label_smoothing 0.1, mean: the loss is NaN and the
  -- gradient 0 everywhere
  it("with label_smoothing and every target ignored gives a NaN loss and zero gradients, as PyTorch", function()
    local x = f64({3, 4}, values(12, 0.37, 0.1), true)
    local loss = F.cross_entropy(x, ms.tensor({-100, -100, -100}, {dtype = "i64"}), {label_smoothing = 0.1})
    loss:backward()
    assert.is_true(loss:item() ~= loss:item())
    assert.are.same({0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, gradcheck.flat(x.grad))
  end)

  it("reads [N, C, d1, d2] as classes on dim 1, the same as flattening by hand", function()
    local x = f64({2, 3, 2, 2}, values(24, 0.77, 0.5))
    local t = ms.tensor({{{0, 2}, {1, 1}}, {{2, 0}, {0, 1}}}, {dtype = "i64"})
    local direct = F.cross_entropy(x, t, {reduction = "none"})
    local by_hand = F.cross_entropy(x:permute(0, 2, 3, 1):reshape(-1, 3), t:reshape(-1), {reduction = "none"})
    assert.are.equal("[2, 2, 2]", tostring(direct:shape()))
    assert.is_true(ms.equal(direct:reshape(-1), by_hand))
  end)

  it("passes gradient checks with label_smoothing, ignore_index and each reduction", function()
    for _, reduction in ipairs({"mean", "sum", "none"}) do
      check_grad(function(x) return F.cross_entropy(x, targets(), {reduction = reduction, label_smoothing = 0.2}) end,
                 {gradcheck.input({2, 4, 3}, {seed = 5})})
    end
    check_grad(function(x) return F.nll_loss(F.log_softmax(x, 1), targets()) end, {gradcheck.input({2, 4, 3}, {seed = 6})})
  end)

  it("names the layout it expects and a bad label_smoothing", function()
    local ok, err = pcall(F.cross_entropy, ms.randn(2, 4, 3), ms.zeros(2, 4, {dtype = "i64"}))
    assert.is_false(ok)
    assert.matches("cross_entropy: expected input %[N, C%] with target %[N%], %[N, C, d1, ...%]", err)
    ok, err = pcall(F.cross_entropy, ms.randn(2, 4), ms.zeros(2, {dtype = "i64"}), {label_smoothing = 1.5})
    assert.is_false(ok)
    assert.matches("label_smoothing must be a number in %[0, 1%], got 1.5", err)
  end)
end)

describe("scaled_dot_product_attention attn_mask", function()
  local function qkv()
    return f64({1, 2, 3, 4}, values(24, 0.53, 0.2), true), f64({1, 2, 5, 4}, values(40, 0.29, 0.7), true),
           f64({1, 2, 5, 4}, values(40, 0.71, 0.4), true)
  end
  local function bool_mask()
    return ms.tensor({{1, 0, 1, 1, 0}, {1, 1, 0, 0, 0}, {0, 0, 1, 1, 1}}, {dtype = "u8"})
  end
  local function float_mask(requires_grad)
    local flat = values(10, 0.43, 0.9)
    for i, v in ipairs(flat) do flat[i] = v * 0.8 end
    return f64({2, 1, 5}, flat, requires_grad)
  end

  it("keeps the positions of a boolean mask that are true, as PyTorch does", function()
    local q, k, v = qkv()
    local o = F.scaled_dot_product_attention(q, k, v, {attn_mask = bool_mask()})
    o:sum():backward()
    assert_close(pytorch.sdpa_bool.value, gradcheck.flat(o), 1e-12, "output")
    local all = {}
    for _, g in ipairs(pytorch.sdpa_bool.grads) do for _, x in ipairs(g) do all[#all + 1] = x end end
    assert_close(all, flat_of({q.grad, k.grad, v.grad}), 1e-12, "q, k, v gradients")
  end)

  it("adds a float mask to the scores and gives it a gradient, as PyTorch does", function()
    local q, k, v = qkv()
    local mask = float_mask(true)
    local o = F.scaled_dot_product_attention(q, k, v, {attn_mask = mask, scale = 0.3})
    o:sum():backward()
    assert_close(pytorch.sdpa_float.value, gradcheck.flat(o), 1e-12, "output")
    local all = {}
    for _, g in ipairs(pytorch.sdpa_float.grads) do for _, x in ipairs(g) do all[#all + 1] = x end end
    assert_close(all, flat_of({q.grad, k.grad, v.grad, mask.grad}), 1e-12, "q, k, v, mask gradients")
  end)

  it("passes gradient checks with either mask", function()
    local q, k, v = qkv()
    check_grad(function(a, b, c) return F.scaled_dot_product_attention(a, b, c, {attn_mask = bool_mask()}) end, {q, k, v})
    check_grad(function(a, b, c, m) return F.scaled_dot_product_attention(a, b, c, {attn_mask = m}) end,
               {q, k, v, float_mask(true)})
  end)

  it("a causal boolean mask gives what is_causal gives", function()
    local q = f64({1, 2, 3, 4}, values(24, 0.53, 0.2))
    local causal = ms.tensor({{1, 0, 0}, {1, 1, 0}, {1, 1, 1}}, {dtype = "u8"})
    assert.is_true(ms.allclose(F.scaled_dot_product_attention(q, q, q, {attn_mask = causal}),
                               F.scaled_dot_product_attention(q, q, q, {is_causal = true}), {rtol = 1e-15, atol = 0}))
  end)

  -- PyTorch 2.15: q = ones [1, 2, 4], k = ones [1, 3, 4], v = arange(12) [1, 3, 4], a bool mask
  -- {{1, 1, 0}, {0, 0, 0}}, backward of o.sum(): the second query row sees no key, its output is
  -- 0 and it adds nothing to any gradient (a float mask of -inf gives the same)
  it("gives 0 for a query row whose keys are all masked, and no NaN in any gradient", function()
    for _, flash in ipairs({true, false}) do
      F.enable_cpu_flash_sdp(flash)
      for _, dtype in ipairs({"f64", "f32"}) do
        local q = ms.ones(1, 2, 4, {dtype = dtype, requires_grad = true})
        local k = ms.ones(1, 3, 4, {dtype = dtype, requires_grad = true})
        local v = ms.arange(12, {dtype = dtype}):view(1, 3, 4):requires_grad_(true)
        local o = F.scaled_dot_product_attention(q, k, v, {attn_mask = ms.tensor({{1, 1, 0}, {0, 0, 0}}, {dtype = "u8"})})
        o:sum():backward()
        local where = (flash and "flash " or "composed ") .. dtype
        local tolerance = dtype == "f64" and 1e-12 or 1e-5
        assert_close({2, 3, 4, 5, 0, 0, 0, 0}, gradcheck.flat(o), tolerance, where .. " output")
        assert_close({0, 0, 0, 0, 0, 0, 0, 0}, gradcheck.flat(q.grad), tolerance, where .. " q")
        assert_close({-2, -2, -2, -2, 2, 2, 2, 2, 0, 0, 0, 0}, gradcheck.flat(k.grad), tolerance, where .. " k")
        assert_close({0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0}, gradcheck.flat(v.grad), tolerance, where .. " v")
      end
    end
    F.enable_cpu_flash_sdp(true)
  end)

  it("gives the gradient of an input whose last dim is strided (keys stored [B, E, S])", function()
    local q = f64({2, 3, 4}, values(24, 0.53, 0.2), true)
    local k_stored = f64({2, 4, 5}, values(40, 0.29, 0.7), true)
    local v = f64({2, 5, 4}, values(40, 0.71, 0.4), true)
    F.scaled_dot_product_attention(q, k_stored:transpose(1, 2), v):sum():backward()
    -- the same keys as a dense leaf of their own
    local k = f64({2, 5, 4}, gradcheck.flat(k_stored:transpose(1, 2):contiguous()), true)
    local q2 = f64({2, 3, 4}, values(24, 0.53, 0.2), true)
    F.scaled_dot_product_attention(q2, k, v):sum():backward()
    assert.is_not_nil(k_stored.grad)
    assert.is_true(ms.allclose(k_stored.grad, k.grad:transpose(1, 2), {rtol = 0, atol = 1e-14}))
    assert.is_true(ms.allclose(q.grad, q2.grad, {rtol = 0, atol = 1e-14}))
  end)

  it("names a mask that does not fit", function()
    local q, k, v = qkv()
    local ok, err = pcall(F.scaled_dot_product_attention, q, k, v, {attn_mask = ms.zeros(3, 4, {dtype = "f64"})})
    assert.is_false(ok)
    assert.matches("attn_mask of shape %[3, 4%] does not broadcast to the attention scores %[1, 2, 3, 5%]", err)
    ok, err = pcall(F.scaled_dot_product_attention, q, k, v, {attn_mask = bool_mask(), is_causal = true})
    assert.is_false(ok)
    assert.matches("give attn_mask or is_causal, not both", err)
  end)

  it("names an operand with fewer than 2 dims", function()
    local q, k, v = qkv()
    local ok, err = pcall(F.scaled_dot_product_attention, q, k:view(-1), v)
    assert.is_false(ok)
    assert.matches("scaled_dot_product_attention: key must have at least 2 dims %(%.%.%., L, E%), got shape %[40%]", err)
    ok, err = pcall(F.scaled_dot_product_attention, ms.randn(8), ms.randn(8), ms.randn(8))
    assert.is_false(ok)
    assert.matches("query must have at least 2 dims", err)
  end)
end)

describe("nn.utils.clip_grad_norm_", function()
  for _, case in ipairs({{"clip_2", 2}, {"clip_inf", math.huge}, {"clip_3", 3}}) do
    it("returns PyTorch's norm and scales the gradients as it does (norm_type " .. tostring(case[2]) .. ")", function()
      local a, b = ms.zeros(3, 2, {dtype = "f64", requires_grad = true}), ms.zeros(4, {dtype = "f64", requires_grad = true})
      a.grad = f64({3, 2}, values(6, 0.61, 0.5))
      local bg = values(4, 1.3, 0.2)
      for i, v in ipairs(bg) do bg[i] = v * 2 end
      b.grad = f64({4}, bg)
      local norm = nn.utils.clip_grad_norm_({a, b}, 0.5, case[2])
      local ref = pytorch[case[1]]
      assert_close(ref.value, {norm}, 1e-12, "norm")
      assert_close(ref.grads[1], gradcheck.flat(a.grad), 1e-12, "a.grad")
      assert_close(ref.grads[2], gradcheck.flat(b.grad), 1e-12, "b.grad")
    end)
  end

  it("takes a model's parameters and leaves small gradients alone", function()
    local model = nn.Linear(3, 2)
    model(ms.randn(4, 3)):sum():backward()
    local before = model.weight.grad:clone()
    local norm = nn.utils.clip_grad_norm_(model:parameters(), 1e6)
    assert.is_true(norm > 0)
    assert.is_true(ms.equal(before, model.weight.grad))
  end)

  it("raises on a non-finite norm when asked to, and names DTensors and bad arguments", function()
    local p = ms.zeros(2, {requires_grad = true})
    p.grad = ms.tensor({0 / 0, 1})
    local ok, err = pcall(nn.utils.clip_grad_norm_, {p}, 1, {error_if_nonfinite = true})
    assert.is_false(ok)
    assert.matches("clip_grad_norm_: the total norm of order 2 of the gradients is nan", err)
    ok, err = pcall(nn.utils.clip_grad_norm_, {p}, -1)
    assert.matches("max_norm must be a non%-negative number", err)
    ok, err = pcall(nn.utils.clip_grad_norm_, {p}, 1, -2)
    assert.matches("norm_type must be a positive number", err)
    local results = dist.spawn(1, function()
      local model = fsdp.FSDP(nn.Linear(2, 2))
      local okd, errd = pcall(nn.utils.clip_grad_norm_, model:parameters(), 1)
      return {ok = okd, err = tostring(errd)}
    end)
    assert.is_false(results[1].ok)
    assert.matches("parameter 1 is a DTensor: clip a sharded model with fsdp.clip_grad_norm_", results[1].err)
  end)
end)

describe("fsdp.clip_grad_norm_ with norm_type = inf", function()
  local function loss_of(model, tokens, targets)
    return F.cross_entropy(model(tokens):view(-1, parity.VOCAB), targets:reshape(-1))
  end

  local function reference()
    ms.set_default_dtype("f64")
    ms.manual_seed(0)
    local model = parity.Model()
    local tokens, targets = parity.batch(1)
    loss_of(model, tokens, targets):backward()
    local largest = 0
    for _, p in model:named_parameters() do
      for _, v in ipairs(gradcheck.flat(p.grad)) do largest = math.max(largest, math.abs(v)) end
    end
    local norm = nn.utils.clip_grad_norm_(model:parameters(), largest / 3, math.huge)
    local grads = {}
    for name, p in model:named_parameters() do grads[name] = gradcheck.flat(p.grad) end
    ms.set_default_dtype("f32")
    return norm, largest, grads
  end

  for _, config in ipairs({{name = "FULL_SHARD on 3 ranks", size = 3, strategy = "FULL_SHARD"},
                           {name = "HYBRID_SHARD on a 2x2 mesh", size = 4, strategy = "HYBRID_SHARD", mesh = {2, 2}}}) do
    it("is the largest gradient magnitude over every shard, clipped as the unwrapped model: " .. config.name, function()
      local norm, largest, grads = reference()
      assert.are.equal(largest, norm)
      local results = dist.spawn(config.size, function(rank, size)
        ms.set_default_dtype("f64")
        ms.manual_seed(0)
        local opts = {sharding_strategy = config.strategy, auto_wrap_policy = fsdp.wrap_policy({parity.Block})}
        if config.mesh then
          opts.device_mesh = dist.init_device_mesh(config.mesh, {mesh_dim_names = {"replicate", "shard"}})
        end
        local model = fsdp.FSDP(parity.Model(), opts)
        local tokens, targets = parity.batch(1)
        local per_rank = parity.GLOBAL_BATCH / size
        loss_of(model, tokens:narrow(0, rank * per_rank, per_rank), targets:narrow(0, rank * per_rank, per_rank)):backward()
        local total = fsdp.clip_grad_norm_(model, largest / 3, math.huge)
        local out = {}
        for name, p in model:named_parameters() do out[name] = gradcheck.flat(p.grad:full_tensor()) end
        return {norm = total, grads = out}
      end)
      for _, res in ipairs(results) do
        assert.is_true(math.abs(res.norm - norm) / norm < 1e-12, ("norm %.17g vs %.17g"):format(res.norm, norm))
        for name, values_ in pairs(grads) do
          assert.is_true(parity.max_relative_error(res.grads[name], values_) < 1e-9, name)
        end
      end
    end)
  end
end)

describe("Adam and AdamW amsgrad", function()
  local initial = {0.8, -1.3, 0.05, 2.1, -0.4, 1.7}
  local curvature = {0.5, 1.5, 3.0, 0.2, 0.9, 2.2}
  local slope = {0.3, -0.7, 0.1, 0.0, 1.2, -0.25}

  -- f_i(p) = 0.5^i * sum c p^2 + e p: a shrinking gradient, so the running maximum matters.
  local function trajectory(make)
    local p = ms.tensor(initial, {dtype = "f64", requires_grad = true})
    local opt = make({p})
    local c, e = ms.tensor(curvature, {dtype = "f64"}), ms.tensor(slope, {dtype = "f64"})
    local rows = {}
    for i = 0, 7 do
      opt:zero_grad()
      local loss = (c * p * p + e * p):sum() * (0.5 ^ i)
      loss:backward()
      opt:step()
      rows[#rows + 1] = gradcheck.flat(p)
    end
    return rows, opt, p
  end

  for name, make in pairs({
    adam = function(ps) return optim.Adam(ps, {lr = 0.05, amsgrad = true, weight_decay = 0.1}) end,
    adamw = function(ps) return optim.AdamW(ps, {lr = 0.05, amsgrad = true, weight_decay = 0.1, betas = {0.8, 0.9}}) end,
    adam_max = function(ps) return optim.Adam(ps, {lr = 0.05, amsgrad = true, maximize = true}) end,
  }) do
    it("follows PyTorch's trajectory: " .. name, function()
      local rows, opt, p = trajectory(make)
      for i, row in ipairs(amsgrad_pytorch[name]) do assert_close(row, rows[i], 1e-12, name .. " step " .. i) end
      assert.is_not_nil(opt.state[p].max_exp_avg_sq)
    end)
  end

  it("differs from plain Adam once the gradient shrinks", function()
    local with = trajectory(function(ps) return optim.Adam(ps, {lr = 0.05, amsgrad = true}) end)
    local without = trajectory(function(ps) return optim.Adam(ps, {lr = 0.05}) end)
    assert_close(without[1], with[1], 1e-12, "first step")
    local apart = 0
    for i, v in ipairs(with[8]) do apart = math.max(apart, math.abs(v - without[8][i])) end
    assert.is_true(apart > 1e-5, ("the last steps differ by only %g"):format(apart))
  end)
end)
