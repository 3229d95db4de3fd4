// `nosa bench` on the CPU backend with the tiny shape: the suites run and write JSON and CSV
// results that carry the machine, the commit and the configuration; the smoke suite also writes
// PNG charts (checked by decoding them); --report-from turns result files into charts and
// Markdown. Also the pieces: the PNG encoder, the chart's ticks and font, the progress line.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "launcher/bench/chart.h"
#include "launcher/bench/png.h"
#include "launcher/bench/progress.h"
#include "launcher/bench/report.h"
#include "tests/common/test_util.h"

#ifdef NOSA_TEST_HAVE_ZLIB
#include <zlib.h>
#endif

namespace nosa::test {
namespace {

// The report holds this text (the whole report is printed when it does not).
void expect_has(const std::string& md, const std::string& text) {
  EXPECT_NE(md.find(text), std::string::npos) << "missing: " << text << "\n" << md;
}

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(BenchCommand, DecodeSuiteWritesResultsWithMachineCommitAndFloor) {
  TempDir dir;
  auto r = run_command(
      fmt::format("{} bench --suite decode --shape tiny --device cpu --mode dense,nosa --batch 1,3 "
                  "--context 300 --steps 2 --warmup 1 --json {} --csv {}",
                  nosa_binary(), (dir / "d.json").string(), (dir / "d.csv").string()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(slurp(dir / "d.json"));
  EXPECT_EQ(j["suite"], "decode");
  EXPECT_FALSE(j["commit"].get<std::string>().empty());
  EXPECT_EQ(j["machine"]["backend"], "cpu");
  ASSERT_EQ(j["results"].size(), 4u);
  for (auto& row : j["results"]) {
    EXPECT_GT(row["tokens_per_s"].get<double>(), 0.0);
    EXPECT_GT(row["floor_ms"].get<double>(), 0.0);
    EXPECT_GT(row["ratio_to_floor"].get<double>(), 0.0);
    // The attention alone (what the SDPA peer is compared with), all layers.
    EXPECT_GT(row["attention_ms_median"].get<double>(), 0.0);
    EXPECT_GT(row["attention_ms_per_layer"].get<double>(), 0.0);
  }
  const std::string csv = slurp(dir / "d.csv");
  EXPECT_NE(csv.find("tokens_per_s"), std::string::npos);
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 5);
}

// --speculation-probe: each sparse row counts layer 1's selections over the timed steps (the tiny
// model: 2 layers, 2 KV heads, 16 of the 19 blocks at position 300), 2 steps x 2 sequences x 2
// heads x 16 blocks; dense rows select nothing and have no such field.
TEST(BenchCommand, DecodeSuiteReportsTheSpeculationProbe) {
  TempDir dir;
  auto r = run_command(
      fmt::format("{} bench --suite decode --shape tiny --device cpu --mode dense,nosa --batch 2 "
                  "--context 300 --steps 2 --warmup 1 --speculation-probe --json {}",
                  nosa_binary(), (dir / "d.json").string()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(slurp(dir / "d.json"));
  ASSERT_EQ(j["results"].size(), 2u);
  EXPECT_FALSE(j["results"][0].contains("speculation"));
  const auto& s = j["results"][1]["speculation"];
  EXPECT_EQ(s["selected"], 2 * 2 * 2 * 16);
  EXPECT_LE(s["predicted"].get<int64_t>(), s["selected"].get<int64_t>());
  EXPECT_LE(s["fresh_predicted"].get<int64_t>(), s["fresh"].get<int64_t>());
  EXPECT_GE(s["predicted_share"].get<double>(), 0.0);
  EXPECT_LE(s["predicted_share"].get<double>(), 1.0);
  EXPECT_EQ(s["fresh_predicted_share_by_layer"].size(), 1u);  // layer 1
  EXPECT_NE(r.err.find("the selection from the layer before's input took"), std::string::npos)
      << r.err;
  // Other suites have no layer-by-layer decoding to probe: refused, not ignored.
  auto off = run_command(fmt::format("{} bench --suite offload --shape tiny --device cpu "
                                     "--speculation-probe",
                                     nosa_binary()));
  EXPECT_NE(off.exit_code, 0);
  EXPECT_NE(off.err.find("--speculation-probe measures the decode suite"), std::string::npos)
      << off.err;
}

TEST(BenchCommand, PrefillSuiteRunsPromptsThroughTheEngine) {
  TempDir dir;
  auto r = run_command(
      fmt::format("{} bench --suite prefill --shape tiny --device cpu --mode nosa --prompts 2 "
                  "--prompt-len 200 --max-batch-tokens 128 --json {}",
                  nosa_binary(), (dir / "p.json").string()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(slurp(dir / "p.json"));
  ASSERT_EQ(j["results"].size(), 1u);
  EXPECT_GT(j["results"][0]["tokens_per_s"].get<double>(), 0.0);
  EXPECT_GE(j["results"][0]["steps"].get<int>(), 4);
}

// Offload flags the suite cannot honour are refused up front, with what to pass instead.
TEST(BenchCommand, OffloadSuiteRefusesOffloadNoneAndDiskWithoutADirectory) {
  const std::string base = nosa_binary() +
                           " bench --suite offload --shape tiny --device cpu --mode nosa --batch 1 "
                           "--context 256 --steps 1 ";
  auto none = run_command(base + "--offload none");
  EXPECT_NE(none.exit_code, 0);
  EXPECT_NE(none.err.find("--offload host or host+disk"), std::string::npos) << none.err;
  auto disk = run_command(base + "--offload host+disk");
  EXPECT_NE(disk.exit_code, 0);
  EXPECT_NE(disk.err.find("needs --disk-kv-dir"), std::string::npos) << disk.err;
  auto micro = run_command(base + "--micro-batch-min-seqs 32,-1");
  EXPECT_NE(micro.exit_code, 0);
  EXPECT_NE(micro.err.find("--micro-batch-min-seqs takes sequence counts >= 0"),
            std::string::npos)
      << micro.err;
}

// --residency device,host: a row each, on tiers of their own; the device rows' steps decide
// residency on the device, the host rows' none, and both select the same chunks per step.
TEST(BenchCommand, OffloadSuiteComparesResidencyOnTheDeviceAndOnTheHost) {
  TempDir dir;
  auto r = run_command(fmt::format("{} bench --suite offload --shape tiny --device cpu --mode nosa "
                                   "--batch 4 --context 1024 --steps 3 --warmup 1 "
                                   "--residency device,host --json {}",
                                   nosa_binary(), (dir / "o.json").string()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(slurp(dir / "o.json"));
  ASSERT_EQ(j["results"].size(), 2u);
  const auto& dev = j["results"][0];
  const auto& host = j["results"][1];
  EXPECT_EQ(dev["label"], "device-residency");
  EXPECT_EQ(dev["residency"], "device");
  EXPECT_EQ(dev["device_residency_steps"], 3);
  EXPECT_EQ(host["label"], "host-residency");
  EXPECT_EQ(host["device_residency_steps"], 0);
  EXPECT_GT(dev["miss_rate"].get<double>(), 0.0);
  EXPECT_GT(dev["pcie_bytes_per_step"].get<double>(), 0.0);
  // Partitions keep a little less spare room than one LRU over the whole cache: close, not equal.
  EXPECT_NEAR(dev["miss_rate"].get<double>(), host["miss_rate"].get<double>(), 0.05);
  EXPECT_NEAR(dev["overlap"].get<double>(), host["overlap"].get<double>(), 0.05);
  auto bad = run_command(fmt::format("{} bench --suite offload --shape tiny --device cpu "
                                     "--residency gpu",
                                     nosa_binary()));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("--residency"), std::string::npos) << bad.err;
}

// --micro-batch-min-seqs with two values alternates them step by step on the same tiers: one row
// each, labelled, with its own steps and counters; the micro-batched one selects what the other
// does (the same model and positions: the same miss rate up to the steps' own selections).
TEST(BenchCommand, OffloadSuiteAlternatesMicroBatchVariantsInOneRun) {
  TempDir dir;
  auto r = run_command(fmt::format("{} bench --suite offload --shape tiny --device cpu --mode nosa "
                                   "--batch 4 --context 1024 --steps 3 --warmup 1 "
                                   "--micro-batch-min-seqs 2,0 --residency host --json {}",
                                   nosa_binary(), (dir / "o.json").string()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(slurp(dir / "o.json"));
  ASSERT_EQ(j["results"].size(), 2u);
  EXPECT_EQ(j["results"][0]["label"], "micro-2");
  EXPECT_EQ(j["results"][0]["micro_batch_min_seqs"], 2);
  EXPECT_EQ(j["results"][1]["label"], "micro-0");
  EXPECT_EQ(j["results"][1]["micro_batch_min_seqs"], 0);
  EXPECT_EQ(j["results"][0]["micro_batch_steps"], 3);  // 4 sequences >= 2: every timed step
  EXPECT_EQ(j["results"][1]["micro_batch_steps"], 0);
  // The host KV's placement: sampled pages of every allocated arena, by NUMA node.
  int64_t sampled = 0;
  for (const auto& [node, pages] : j["results"][0]["host_numa_pages"].items()) {
    EXPECT_GE(std::stoi(node), -1);
    sampled += pages.get<int64_t>();
  }
  EXPECT_GE(sampled, 16);  // at least one arena, 16 pages each
  EXPECT_EQ(j["results"][0]["device_numa_node"], -1);  // the CPU backend has no device node
  for (const auto& row : j["results"]) {
    EXPECT_EQ(row["steps"], 3);
    EXPECT_GT(row["step_ms_median"].get<double>(), 0.0);
    EXPECT_GT(row["miss_rate"].get<double>(), 0.0);
    EXPECT_LT(row["miss_rate"].get<double>(), 1.0);
  }
}

// Each residency alternates its own variants: copy overlaps on the device (a cache with
// partitions runs whole steps), micro-batch thresholds on the host.
TEST(BenchCommand, OffloadSuiteAlternatesEachResidencysOwnVariants) {
  TempDir dir;
  auto r = run_command(fmt::format("{} bench --suite offload --shape tiny --device cpu --mode nosa "
                                   "--batch 4 --context 1024 --steps 2 --warmup 1 "
                                   "--residency device,host --copy-overlap on,off "
                                   "--micro-batch-min-seqs 2,0 --json {}",
                                   nosa_binary(), (dir / "o.json").string()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(slurp(dir / "o.json"));
  ASSERT_EQ(j["results"].size(), 4u);
  const auto& rows = j["results"];
  EXPECT_EQ(rows[0]["label"], "device-residency overlap-on");
  EXPECT_EQ(rows[0]["copy_overlap"], true);
  EXPECT_EQ(rows[1]["label"], "device-residency overlap-off");
  EXPECT_EQ(rows[1]["copy_overlap"], false);
  EXPECT_EQ(rows[2]["label"], "host-residency micro-2");
  EXPECT_EQ(rows[3]["label"], "host-residency micro-0");
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(rows[i]["device_residency_steps"], 2) << i;
    EXPECT_EQ(rows[i]["micro_batch_steps"], 0) << i;
    EXPECT_FALSE(rows[i].contains("micro_batch_min_seqs")) << i;
  }
  EXPECT_EQ(rows[2]["micro_batch_steps"], 2);
  EXPECT_EQ(rows[3]["micro_batch_steps"], 0);
  EXPECT_FALSE(rows[2].contains("copy_overlap"));
  auto bad = run_command(fmt::format("{} bench --suite offload --shape tiny --device cpu "
                                     "--copy-overlap maybe",
                                     nosa_binary()));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("--copy-overlap takes on or off"), std::string::npos) << bad.err;
}

// --prefetch on,off,auto alternates prefetching step by step on the same tiers (residency on
// the device; a 4-layer tiny model, so that layers 2 and 3 prefetch): a row each, the prefetch's
// copies and hits counted in its row only (auto never prefetches on the CPU), and a value other
// than on, off or auto refused.
TEST(BenchCommand, OffloadSuiteAlternatesPrefetchingOnOffAndAuto) {
  TempDir dir;
  auto r = run_command(fmt::format("{} bench --suite offload --shape tiny --layers 4 --device cpu "
                                   "--mode nosa --batch 2 --context 600 --steps 3 --warmup 1 "
                                   "--prefetch on,off,auto --json {}",
                                   nosa_binary(), (dir / "o.json").string()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(slurp(dir / "o.json"));
  ASSERT_EQ(j["results"].size(), 3u);
  const auto& on = j["results"][0];
  const auto& off = j["results"][1];
  const auto& automatic = j["results"][2];
  EXPECT_EQ(on["label"], "prefetch-on");
  EXPECT_EQ(on["prefetch"], true);
  EXPECT_EQ(on["prefetch_steps"], 3);
  EXPECT_EQ(off["label"], "prefetch-off");
  EXPECT_EQ(off["prefetch"], false);
  EXPECT_EQ(off["prefetch_steps"], 0);
  EXPECT_EQ(automatic["label"], "prefetch-auto");
  EXPECT_EQ(automatic["prefetch"], "auto");
  EXPECT_EQ(automatic["prefetch_steps"], 0);
  EXPECT_EQ(automatic["prefetched_per_step"].get<double>(), 0);
  EXPECT_GT(on["prefetched_per_step"].get<double>(), 0);
  EXPECT_GT(on["prefetch_hits_per_step"].get<double>(), 0);
  EXPECT_LE(on["prefetch_hits_per_step"].get<double>(), on["prefetched_per_step"].get<double>());
  EXPECT_EQ(off["prefetched_per_step"].get<double>(), 0);
  // The misses left on the critical path fall; the blocks new to the partitions do not.
  EXPECT_LT(on["miss_rate"].get<double>(), on["new_rate"].get<double>());
  EXPECT_EQ(off["miss_rate"].get<double>(), off["new_rate"].get<double>());
  EXPECT_LT(on["miss_rate"].get<double>(), off["miss_rate"].get<double>());
  auto bad = run_command(fmt::format("{} bench --suite offload --shape tiny --device cpu "
                                     "--prefetch maybe",
                                     nosa_binary()));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("--prefetch takes on, off or auto"), std::string::npos) << bad.err;
  // A controlled miss rate replaces the selections the prefetch guessed: refused together.
  for (const char* pf : {"on", "off,auto"}) {
    auto synthetic = run_command(fmt::format("{} bench --suite offload --shape tiny --device cpu "
                                             "--prefetch {} --miss-rate 0.1",
                                             nosa_binary(), pf));
    EXPECT_NE(synthetic.exit_code, 0) << pf;
    EXPECT_NE(synthetic.err.find("--prefetch on or auto needs the model's own selection"),
              std::string::npos)
        << synthetic.err;
  }
}

// --select-path names the split path's two finishes too; an unknown name is refused with the
// names it takes.
TEST(BenchCommand, SelectPathTakesTheSplitFinishesAndRefusesOtherNames) {
  TempDir dir;
  auto r = run_command(fmt::format("{} bench --suite decode --shape tiny --device cpu --mode nosa "
                                   "--batch 2 --context 256 --steps 1 --warmup 0 "
                                   "--select-path split-spread --json {}",
                                   nosa_binary(), (dir / "d.json").string()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(slurp(dir / "d.json"))["results"].size(), 1u);
  auto bad = run_command(fmt::format("{} bench --suite decode --shape tiny --device cpu "
                                     "--select-path split-sometimes",
                                     nosa_binary()));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("unknown selection path 'split-sometimes' (use split, split-finish, "
                         "split-spread, tiled, tiled-inline, tiled-exact, "
                         "tiled-exact-inline, per-token or empty)"),
            std::string::npos)
      << bad.err;
}

namespace bench = nosa::launcher::bench;

// ---- a PNG reader for the checks ----------------------------------------------------------------

struct DecodedPng {
  uint32_t width = 0, height = 0;
  int bit_depth = 0, colour_type = 0;
  size_t palette_size = 0;
  std::vector<uint8_t> pixels;  // palette indices, row-major
};

uint32_t be32(const std::string& b, size_t at) {
  return uint32_t(uint8_t(b[at])) << 24 | uint32_t(uint8_t(b[at + 1])) << 16 |
         uint32_t(uint8_t(b[at + 2])) << 8 | uint32_t(uint8_t(b[at + 3]));
}

uint32_t chunk_crc(const std::string& type_and_data) {
  const auto* p = reinterpret_cast<const uint8_t*>(type_and_data.data());
#ifdef NOSA_TEST_HAVE_ZLIB
  return uint32_t(::crc32(0L, p, uInt(type_and_data.size())));  // zlib's, not the encoder's
#else
  return bench::crc32(p, type_and_data.size());
#endif
}

// The zlib stream's bytes: zlib's inflate where the test has it, else stored blocks only.
::testing::AssertionResult inflate_idat(const std::string& z, size_t expected, std::string& out) {
#ifdef NOSA_TEST_HAVE_ZLIB
  out.assign(expected + 1, '\0');
  uLongf n = uLongf(out.size());
  const int rc = ::uncompress(reinterpret_cast<Bytef*>(out.data()), &n,
                              reinterpret_cast<const Bytef*>(z.data()), uLong(z.size()));
  if (rc != Z_OK) return ::testing::AssertionFailure() << "inflate failed: " << rc;
  out.resize(n);
#else
  if (z.size() < 6 || (uint8_t(z[0]) & 0x0F) != 8 || (uint8_t(z[0]) * 256 + uint8_t(z[1])) % 31)
    return ::testing::AssertionFailure() << "bad zlib header";
  size_t at = 2;
  for (bool last = false; !last;) {
    if (at + 5 > z.size()) return ::testing::AssertionFailure() << "truncated deflate block";
    const uint8_t h = uint8_t(z[at]);
    last = h & 1;
    if ((h >> 1) != 0) return ::testing::AssertionFailure() << "not a stored block";
    const size_t len = uint8_t(z[at + 1]) | size_t(uint8_t(z[at + 2])) << 8;
    const size_t nlen = uint8_t(z[at + 3]) | size_t(uint8_t(z[at + 4])) << 8;
    if ((len ^ 0xFFFF) != nlen) return ::testing::AssertionFailure() << "LEN != ~NLEN";
    out.append(z, at + 5, len);
    at += 5 + len;
  }
  if (be32(z, at) != bench::adler32(reinterpret_cast<const uint8_t*>(out.data()), out.size()))
    return ::testing::AssertionFailure() << "bad Adler-32";
#endif
  if (out.size() != expected)
    return ::testing::AssertionFailure()
           << "IDAT inflates to " << out.size() << " bytes, not " << expected;
  return ::testing::AssertionSuccess();
}

// Checks the signature, every chunk's CRC, IHDR, PLTE and IEND, and decodes the pixels.
::testing::AssertionResult decode_png(const std::string& b, DecodedPng& png) {
  if (b.compare(0, 8, "\x89PNG\r\n\x1a\n") != 0)
    return ::testing::AssertionFailure() << "no PNG signature";
  std::string idat;
  std::vector<std::string> types;
  for (size_t at = 8; at < b.size();) {
    if (at + 12 > b.size()) return ::testing::AssertionFailure() << "truncated chunk";
    const uint32_t len = be32(b, at);
    if (at + 12 + len > b.size()) return ::testing::AssertionFailure() << "chunk past the end";
    const std::string type = b.substr(at + 4, 4), data = b.substr(at + 8, len);
    if (chunk_crc(type + data) != be32(b, at + 8 + len))
      return ::testing::AssertionFailure() << "bad CRC in chunk " << type;
    types.push_back(type);
    if (type == "IHDR") {
      if (len != 13) return ::testing::AssertionFailure() << "IHDR of " << len << " bytes";
      png.width = be32(data, 0);
      png.height = be32(data, 4);
      png.bit_depth = uint8_t(data[8]);
      png.colour_type = uint8_t(data[9]);
      if (data[10] || data[11] || data[12])
        return ::testing::AssertionFailure() << "unexpected compression, filter or interlace";
    } else if (type == "PLTE") {
      png.palette_size = len / 3;
    } else if (type == "IDAT") {
      idat += data;
    }
    at += 12 + len;
  }
  if (types.empty() || types.front() != "IHDR" || types.back() != "IEND")
    return ::testing::AssertionFailure() << "IHDR must come first and IEND last";
  if (png.bit_depth != 8 || png.colour_type != 3 || png.palette_size == 0)
    return ::testing::AssertionFailure() << "not an 8-bit palette image";
  std::string raw;
  const size_t stride = size_t(png.width) + 1;
  auto inflated = inflate_idat(idat, stride * png.height, raw);
  if (!inflated) return inflated;
  for (uint32_t y = 0; y < png.height; ++y) {
    if (raw[y * stride] != 0) return ::testing::AssertionFailure() << "filter type not 0";
    for (uint32_t x = 0; x < png.width; ++x) {
      const uint8_t v = uint8_t(raw[y * stride + 1 + x]);
      if (v >= png.palette_size) return ::testing::AssertionFailure() << "index past the palette";
      png.pixels.push_back(v);
    }
  }
  return ::testing::AssertionSuccess();
}

// ---- the smoke suite ----------------------------------------------------------------------------

// The engine's settings from the environment (NOSA_ variables) are part of the recorded
// command, in front and quoted as a shell needs; the scripts' and tests' own are not (NOSA_COMMIT
// names the commit; NOSA_BINARY, which the tests' environment sets, where nosa is).
TEST(BenchCommand, RecordsTheEnvironmentsSettingsWithItsCommand) {
  TempDir dir;
  const std::string json_path = (dir / "e.json").string();
  auto r = run_command(fmt::format(
      "NOSA_PDL=0 NOSA_PREFILL_WGMMA='1 2' NOSA_COMMIT=abc {} bench --suite decode --shape tiny "
      "--device cpu --mode dense --batch 1 --context 256 --steps 1 --warmup 0 --json {}",
      nosa_binary(), json_path));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string command = nlohmann::json::parse(slurp(json_path))["command"];
  const size_t bench = command.find("nosa bench --suite decode");
  ASSERT_NE(bench, std::string::npos) << command;
  const size_t pdl = command.find("NOSA_PDL=0 "), wgmma = command.find("NOSA_PREFILL_WGMMA='1 2' ");
  EXPECT_LT(pdl, bench) << command;
  EXPECT_LT(wgmma, bench) << command;
  EXPECT_LT(pdl, wgmma) << command;  // sorted by name
  EXPECT_EQ(command.find("NOSA_COMMIT"), std::string::npos) << command;
  EXPECT_EQ(command.find("NOSA_BINARY"), std::string::npos) << command;
}

TEST(BenchCommand, SmokeSuiteWritesJsonCsvAndPlotsThatDecode) {
  TempDir dir;
  const std::string json_path = (dir / "s.json").string(), csv_path = (dir / "s.csv").string();
  const std::string plots = (dir / "plots").string();
  auto r =
      run_command(fmt::format("{} bench --suite smoke --device cpu --json {} --csv {} --plot {}",
                              nosa_binary(), json_path, csv_path, plots));
  ASSERT_EQ(r.exit_code, 0) << r.err;

  // The progress line: plain lines (stderr is a file here), i of n, elapsed.
  EXPECT_NE(r.err.find("[bench] 1/28 decode dense B=1 C=256 (elapsed"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("[bench] 28/28 prefill nosa"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("[bench] 28 configurations in"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find('\r'), std::string::npos);

  // JSON: the run's metadata and 18 decode + 8 offload + 2 prefill rows.
  const auto j = nlohmann::json::parse(slurp(json_path));
  EXPECT_EQ(j["suite"], "smoke");
  EXPECT_FALSE(j["commit"].get<std::string>().empty());
  EXPECT_FALSE(j["date"].get<std::string>().empty());
  EXPECT_EQ(j["machine"]["backend"], "cpu");
  EXPECT_NE(j["command"].get<std::string>().find("nosa bench --suite smoke"), std::string::npos);
  // The command reproduces the numbers; where this run wrote them is not part of it.
  for (const char* out : {"--json", "--csv", "--plot", "s.json"})
    EXPECT_EQ(j["command"].get<std::string>().find(out), std::string::npos) << j["command"];
  const auto& rows = j["results"];
  ASSERT_EQ(rows.size(), 28u);
  std::map<std::string, int> per_suite;
  std::set<std::string> misses;
  for (const auto& row : rows) {
    ++per_suite[row["suite"].get<std::string>()];
    EXPECT_EQ(row["shape"], "tiny");
    EXPECT_FALSE(row.contains("skipped")) << row.dump();
    EXPECT_GT(row["tokens_per_s"].get<double>(), 0.0) << row.dump();
    if (row["suite"] == "offload") {
      misses.insert(row["controlled_miss_rate"].dump());
      for (const char* k : {"overlap", "miss_rate"}) {
        EXPECT_GE(row[k].get<double>(), 0.0);
        EXPECT_LE(row[k].get<double>(), 1.0);
      }
      EXPECT_EQ(row["offload"], "host");
      // Host only: nothing moves to or from disk, and the floor says so.
      EXPECT_EQ(row["disk_bytes_per_step"].get<double>(), 0.0) << row.dump();
      EXPECT_EQ(row["disk_write_bytes_per_step"].get<double>(), 0.0) << row.dump();
      EXPECT_EQ(row["disk_floor_ms"].get<double>(), 0.0) << row.dump();
    }
  }
  EXPECT_EQ(per_suite["decode"], 18);
  EXPECT_EQ(per_suite["offload"], 8);
  EXPECT_EQ(per_suite["prefill"], 2);
  EXPECT_EQ(misses, (std::set<std::string>{"null", "0.0", "0.2", "0.5"}));

  // CSV: a header, then the JSON's rows in order with the same values.
  const auto csv = bench::parse_csv(slurp(csv_path));
  ASSERT_EQ(csv.size(), rows.size() + 1);
  const auto& head = csv[0];
  auto col = [&](const std::string& name) {
    auto it = std::find(head.begin(), head.end(), name);
    EXPECT_NE(it, head.end()) << name;
    return size_t(it - head.begin());
  };
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& cells = csv[i + 1];
    ASSERT_EQ(cells.size(), head.size()) << "line " << i + 2;
    EXPECT_EQ(cells[col("commit")], j["commit"].get<std::string>());
    EXPECT_EQ(cells[col("backend")], "cpu");
    EXPECT_EQ(cells[col("command")], j["command"].get<std::string>());
    for (auto it = rows[i].begin(); it != rows[i].end(); ++it) {
      const std::string want = it->is_string() ? it->get<std::string>()
                               : it->is_null() ? ""
                                               : it->dump();
      EXPECT_EQ(cells[col(it.key())], want) << it.key() << " of row " << i;
    }
  }

  // PNG charts: throughput against batch size, context and the controlled miss rate.
  for (const char* name : {"decode-batch-tiny", "decode-context-tiny", "miss-rate-tiny"}) {
    SCOPED_TRACE(name);
    const std::string bytes = slurp(dir / "plots" / (std::string(name) + ".png"));
    DecodedPng png;
    ASSERT_TRUE(decode_png(bytes, png));
    EXPECT_EQ(png.width, 960u);
    EXPECT_EQ(png.height, 600u);
    const std::set<uint8_t> used(png.pixels.begin(), png.pixels.end());
    EXPECT_GE(used.size(), 5u) << "background, ink, grid and two series at least";
  }

  // The same charts from the result files: the JSON and the CSV give the bytes of the run's.
  for (const std::string& from : {json_path, csv_path}) {
    const std::string again =
        (dir / ("again-" + std::filesystem::path(from).extension().string().substr(1))).string();
    auto rr = run_command(fmt::format("{} bench --report-from {} --plot {} --markdown {}/r.md",
                                      nosa_binary(), from, again, again));
    ASSERT_EQ(rr.exit_code, 0) << rr.err;
    for (const char* name : {"decode-batch-tiny", "decode-context-tiny", "miss-rate-tiny"})
      EXPECT_EQ(slurp(std::filesystem::path(again) / (std::string(name) + ".png")),
                slurp(dir / "plots" / (std::string(name) + ".png")))
          << name << " from " << from;
    const std::string md = slurp(std::filesystem::path(again) / "r.md");
    expect_has(md, "![Decode throughput vs batch size, tiny](decode-batch-tiny.png)");
    expect_has(md, "nosa bench --suite smoke");
    expect_has(md, "| NOSA vs dense, KV in HBM | tiny | B=1 C=256 |");
  }
}

// ---- reports from result files ------------------------------------------------------------------

// One decode row of a result file: nosa-8b-like, B=64, 16K, KV in HBM, at tok_s tokens/s.
nlohmann::json decode_result(const char* mode, int tp, double tok_s) {
  return nlohmann::json{{"suite", "decode"},      {"shape", "nosa-8b-like"}, {"mode", mode},
                        {"batch", 64},            {"context", 16384},        {"tp", tp},
                        {"offload", "none"},      {"tokens_per_s", tok_s},
                        {"step_ms_median", 64e3 / tok_s}};
}

// NOSA against InfLLM-V2 offloaded pairs rows of the same variant (a run alternating prefetching
// has a row of each per mode): on with on, off with off, never across.
TEST(BenchCommand, ReportComparesOffloadedModesOnEqualTerms) {
  TempDir dir;
  auto row = [](const char* mode, bool prefetch, double tok_s) {
    return nlohmann::json{{"suite", "offload"},   {"shape", "nosa-8b-like"},
                          {"mode", mode},         {"batch", 16},
                          {"context", 16384},     {"tp", 1},
                          {"offload", "host"},    {"residency", "device"},
                          {"prefetch", prefetch}, {"label", prefetch ? "prefetch-on" : "prefetch-off"},
                          {"tokens_per_s", tok_s}, {"step_ms_median", 16e3 / tok_s}};
  };
  nlohmann::json run = {{"commit", "abc1234"},
                        {"suite", "offload"},
                        {"tp", 1},
                        {"machine", {{"backend", "cuda:0 (GPU)"}, {"cpu_threads", 16}}},
                        {"results",
                         {row("nosa", true, 1300), row("nosa", false, 1200),
                          row("infllmv2", true, 520), row("infllmv2", false, 600)}}};
  {
    std::ofstream out(dir / "run.json");
    out << run.dump();
  }
  auto r = run_command(fmt::format("{} bench --report-from '{}?run=r' --markdown {} "
                                   "--report-sections comparisons,targets",
                                   nosa_binary(), (dir / "run.json").string(),
                                   (dir / "report.md").string()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string md = slurp(dir / "report.md");
  expect_has(md, "| 1300 | 520 | 2.50x |");
  expect_has(md, "| 1200 | 600 | 2.00x |");
  EXPECT_EQ(md.find("| 1300 | 600 |"), std::string::npos) << md;
  EXPECT_EQ(md.find("| 1200 | 520 |"), std::string::npos) << md;
}

TEST(BenchCommand, ReportFromFilesPlotsGpuScalingAndChecksTargets) {
  TempDir dir;
  // Two runs of a JSONL file (TP = 1 and 2) whose commands are in a log, as on the GPU machines,
  // and a peer file.
  auto decode_row = [](const char* mode, int tp, double tok_s, double ratio) {
    nlohmann::json r = decode_result(mode, tp, tok_s);
    r["ratio_to_floor"] = ratio;
    return r;
  };
  nlohmann::json run1 = {
      {"commit", "unknown"},
      {"suite", "decode"},
      {"tp", 1},
      {"machine", {{"backend", "cuda:0 (GPU)"}, {"cpu_threads", 32}}},
      {"results", {decode_row("nosa", 1, 4000, 2.5), decode_row("dense", 1, 3000, 1.8)}}};
  nlohmann::json run2 = run1;
  run2["tp"] = 2;
  run2["results"] = {decode_row("nosa", 2, 7200, 3.0), decode_row("dense", 2, 4500, 2.2)};
  {
    std::ofstream out(dir / "runs.jsonl");
    out << run1.dump() << "\n" << run2.dump() << "\n";
    std::ofstream log(dir / "summary.txt");
    log << "$ nosa bench --suite decode --shape nosa-8b-like --tp 4   (4)\n  FAILED (1): no GPUs\n"
        << "$ nosa bench --suite decode --shape nosa-8b-like --tp 1   (1)\n  decode ...\n"
        << "$ nosa bench --suite decode --shape nosa-8b-like --tp 2   (2)\n  decode ...\n";
    std::ofstream peer(dir / "peer.json");
    peer << nlohmann::json{{"peer", "transformers"},
                           {"command", "bench_transformers.py"},
                           {"results",
                            {{{"shape", "nosa-8b-like"},
                              {"batch", 64},
                              {"context", 16384},
                              {"decode_step_ms", 400.0},
                              {"decode_tokens_per_s", 160.0}}}}}
                .dump();
  }
  const std::string spec =
      fmt::format("{}?run=r&commit=abc1234&commands={}", (dir / "runs.jsonl").string(),
                  (dir / "summary.txt").string());
  auto r = run_command(fmt::format(
      "{} bench --report-from '{}' '{}?run=r&commit=abc1234' --plot {} --plot-prefix x- "
      "--markdown {} --report-sections figures,comparisons,targets",
      nosa_binary(), spec, (dir / "peer.json").string(), (dir / "plots").string(),
      (dir / "report.md").string()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  DecodedPng png;
  ASSERT_TRUE(decode_png(slurp(dir / "plots" / "x-gpus-nosa-8b-like.png"), png));
  const std::string md = slurp(dir / "report.md");
  expect_has(md,
             "![Decode scaling with GPUs (tensor parallel), nosa-8b-like]"
             "(plots/x-gpus-nosa-8b-like.png)");
  expect_has(md, "commit `abc1234` (the file says `unknown`)");
  expect_has(md, "`mpirun -np 2 nosa bench --suite decode --shape nosa-8b-like --tp 2`");
  expect_has(md,
             "| TP=2 vs TP=1, nosa KV in HBM | nosa-8b-like | B=64 C=16K TP=2 | 7200 | "
             "4000 | 1.80x | efficiency 0.90 | r |");
  expect_has(md,
             "| dense decode vs transformers generate | nosa-8b-like | B=64 C=16K | 3000 | "
             "160 | 18.75x |");
  expect_has(md, "dense B=64 C=16K TP=2 (r): 0.75 | **partly met** |");
  expect_has(md,
             "step within 1.3x of its floor, nosa-8b-like | issue 3 | 2.50x to 2.50x over "
             "1 row(s); runs r | **not met** |");
  expect_has(md,
             "| KV beyond HBM: nosa-8b-like, 32 x 128K (128 GiB of KV) on one GPU with "
             "host and disk | issue 4 | no rows | **not run** |");
}

TEST(BenchCommand, ReportFromPeersComparesAttentionWithSdpaAndShowsScalingAndKvOnDisk) {
  TempDir dir;
  using nlohmann::json;
  auto decode_row = [](const char* mode, int tp, double tok_s, double attn_ms,
                       const char* label = "") {
    json r = decode_result(mode, tp, tok_s);
    r["label"] = label;
    r["attention_ms_median"] = attn_ms;
    return r;
  };
  const json machine = {{"backend", "cuda:0 (GPU)"}, {"gpu", "4 x NVIDIA H200"}, {"gpus", 4}};
  // bench.jsonl as scripts/gpu-report-run.sh writes it: decode (one GPU), prefill, the scaling
  // series (label "tp", TP = 1, 2, 4) and the run with KV on disk.
  json dec = {{"commit", "abc1234"},
              {"suite", "decode"},
              {"tp", 1},
              {"machine", machine},
              {"command", "nosa bench --suite decode"},
              {"results", {decode_row("nosa", 1, 4000, 4.0), decode_row("dense", 1, 3000, 10.0)}}};
  json pre = {{"commit", "abc1234"},
              {"suite", "prefill"},
              {"tp", 1},
              {"machine", machine},
              {"results",
               {{{"suite", "prefill"},
                 {"shape", "nosa-8b-like"},
                 {"mode", "nosa"},
                 {"prompts", 16},
                 {"prompt_len", 16384},
                 {"seconds", 18.0},
                 {"tokens_per_s", 14563.0}}}}};
  std::vector<json> tp_docs;
  for (auto [tp, tok_s] : {std::pair{1, 4500.0}, {2, 8100.0}, {4, 14400.0}}) {
    json d = dec;
    d["tp"] = tp;
    d["command"] = fmt::format("mpirun -np {} nosa bench --suite decode --label tp", tp);
    d["results"] = {decode_row("nosa", tp, tok_s, 0, "tp")};
    d["results"][0].erase("attention_ms_median");
    tp_docs.push_back(d);
  }
  json disk = {{"commit", "abc1234"},
               {"suite", "offload"},
               {"tp", 1},
               {"machine", machine},
               {"results",
                {{{"suite", "offload"},
                  {"shape", "nosa-8b-like"},
                  {"mode", "nosa"},
                  {"batch", 32},
                  {"context", 131072},
                  {"offload", "host+disk"},
                  {"controlled_miss_rate", nullptr},
                  {"tokens_per_s", 100.0},
                  {"step_ms_median", 320.0},
                  {"host_gib", 96.0},
                  {"disk_gib", 32.4},
                  {"gpu_cache_gib", 1.1},
                  {"populate_s", 70.0},
                  {"miss_rate", 0.15}}}}};
  // peers.jsonl: the SDPA peer (attention alone) and the transformers peer.
  const json sdpa = {{"peer", "pytorch sdpa"},
                     {"commit", "abc1234"},
                     {"machine", machine},
                     {"command", "python3 scripts/bench_sdpa.py"},
                     {"results",
                      {{{"suite", "decode"},
                        {"mode", "sdpa"},
                        {"shape", "nosa-8b-like"},
                        {"batch", 64},
                        {"context", 16384},
                        {"layers", 32},
                        {"attn_step_ms", 12.0},
                        {"attn_layer_ms", 0.375}},
                       {{"suite", "decode"},
                        {"mode", "sdpa-sparse"},
                        {"shape", "nosa-8b-like"},
                        {"batch", 64},
                        {"context", 16384},
                        {"layers", 32},
                        {"attn_step_ms", 6.0},
                        {"select_step_ms", 9.0}},
                       {{"suite", "prefill"},
                        {"mode", "sdpa"},
                        {"shape", "nosa-8b-like"},
                        {"prompts", 16},
                        {"prompt_len", 16384},
                        {"attn_seconds", 2.88},
                        {"tflops", 390.0}}}}};
  const json tf = {{"peer", "transformers"},
                   {"results",
                    {{{"shape", "nosa-8b-like"},
                      {"batch", 64},
                      {"context", 16384},
                      {"decode_step_ms", 400.0}}}}};
  std::filesystem::create_directories(dir / "run");
  {
    std::ofstream b(dir / "run" / "bench.jsonl");
    for (const json& d : {dec, pre, tp_docs[0], tp_docs[1], tp_docs[2], disk})
      b << d.dump() << "\n";
    std::ofstream p(dir / "run" / "peers.jsonl");
    p << sdpa.dump() << "\n" << tf.dump() << "\n";
  }
  auto r = run_command(fmt::format(
      "{} bench --report-from {} {} --plot {} --markdown {} "
      "--report-sections figures,comparisons,targets,attention,capacity",
      nosa_binary(), (dir / "run" / "bench.jsonl").string(), (dir / "run" / "peers.jsonl").string(),
      (dir / "plots").string(), (dir / "report.md").string()));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string md = slurp(dir / "report.md");
  // Decode attention: the engine's (4 ms NOSA, 10 ms dense) against SDPA (12 ms dense; 9 ms for
  // selection + gather + SDPA).
  expect_has(md,
             "| nosa-8b-like | 64 | 16K | nosa | 16.000 | 4.000 | 12.000 | 6.000 | 9.000 | "
             "2.25x | run |");
  expect_has(md,
             "| nosa-8b-like | 64 | 16K | dense | 21.333 | 10.000 | 12.000 | 6.000 | "
             "9.000 | 1.20x | run |");
  // Prefill: SDPA's attention alone is 16% of the engine's whole prefill.
  expect_has(md, "| nosa-8b-like | 16 x 16K | 2.880 | 390 | nosa | 18.00 | 16% | run |");
  expect_has(md, "`python3 scripts/bench_sdpa.py`");
  // The target of the SDPA comparison.
  expect_has(md,
             "selection + gather + SDPA, same run, nosa-8b-like | issue 8 | B=64 C=16K "
             "(run): 2.25x | **met** |");
  // Scaling: the labelled series against its own TP=1 row, efficiency in the targets.
  expect_has(md,
             "| TP=4 vs TP=1, nosa KV in HBM | nosa-8b-like | B=64 C=16K TP=4 | 14400 | "
             "4500 | 3.20x | efficiency 0.80 | run |");
  expect_has(md, "nosa-8b-like nosa B=64 C=16K (run): 0.80 | **measured (no target)** |");
  // The GPUs chart holds only the series measured on several GPU counts.
  expect_has(md, "| nosa B=64 C=16K [tp] | 4 | 14400 |");
  EXPECT_EQ(md.find("| nosa B=64 C=16K | 1 |"), std::string::npos) << md;
  DecodedPng png;
  ASSERT_TRUE(decode_png(slurp(dir / "plots" / "gpus-nosa-8b-like.png"), png));
  // KV on disk: its own table and the beyond-HBM target.
  expect_has(md,
             "| nosa-8b-like | nosa host+disk | B=32 C=128K | 100 | 320.000 | 96.0 | 32.4 | "
             "1.10 | 70.0 | 0.150 | run |");
  expect_has(md, "100 tok/s, host 96 GiB, disk 32 GiB (run run) | **met** |");
  // SDPA rows carry no tokens/s: they are in no chart and no tokens/s comparison.
  EXPECT_EQ(md.find("| sdpa"), std::string::npos) << md;
}

TEST(BenchCommand, ReportFromAMissingFileIsAClearError) {
  auto r = run_command(
      fmt::format("{} bench --report-from /nonexistent/x.json --plot /tmp/x", nosa_binary()));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("cannot read /nonexistent/x.json"), std::string::npos) << r.err;
}

// ---- the pieces ---------------------------------------------------------------------------------

TEST(BenchPng, EncodesAPaletteImageThatDecodesToItsPixels) {
  bench::IndexedImage im(7, 3, {{255, 255, 255}, {0, 0, 0}, {200, 10, 10}});
  for (int x = 0; x < 7; ++x) im.set(x, 1, uint8_t(1 + x % 2));
  im.set(-1, 0, 2);  // outside: ignored
  im.set(7, 0, 2);
  DecodedPng png;
  ASSERT_TRUE(decode_png(bench::encode_png(im), png));
  EXPECT_EQ(png.width, 7u);
  EXPECT_EQ(png.height, 3u);
  EXPECT_EQ(png.palette_size, 3u);
  EXPECT_EQ(png.pixels, im.pixels);
  // The checksums of the zlib stream and the chunks: the published check values.
  const std::string check = "123456789";
  EXPECT_EQ(bench::crc32(reinterpret_cast<const uint8_t*>(check.data()), check.size()),
            0xCBF43926u);
  EXPECT_EQ(bench::adler32(reinterpret_cast<const uint8_t*>(check.data()), check.size()),
            0x091E01DEu);
}

TEST(BenchChart, TicksAreRoundAndLabelsShort) {
  EXPECT_EQ(bench::tick_label(0), "0");
  EXPECT_EQ(bench::tick_label(16384), "16K");
  EXPECT_EQ(bench::tick_label(131072), "128K");
  EXPECT_EQ(bench::tick_label(1048576), "1M");
  EXPECT_EQ(bench::tick_label(1500), "1.5K");
  EXPECT_EQ(bench::tick_label(64), "64");
  EXPECT_EQ(bench::tick_label(0.1 + 0.2), "0.3");
  EXPECT_EQ(bench::nice_ticks(0, 7435, 5), (std::vector<double>{0, 2000, 4000, 6000}));
  EXPECT_EQ(bench::nice_ticks(0, 0.4, 4),
            (std::vector<double>{0, 0.1, 0.2, 0.30000000000000004, 0.4}));
  EXPECT_EQ(bench::text_width("abc", 2), 34);
}

TEST(BenchChart, DrawsTheGlyphsOfTheFont) {
  // "T": a full top row, then the middle column.
  bench::IndexedImage im(5, 7, {{255, 255, 255}, {0, 0, 0}});
  bench::draw_text(im, 0, 0, "T", 1, 1);
  for (int x = 0; x < 5; ++x) EXPECT_EQ(im.at(x, 0), 1) << x;
  for (int y = 1; y < 7; ++y) {
    EXPECT_EQ(im.at(2, y), 1) << y;
    EXPECT_EQ(im.at(0, y), 0) << y;
  }
  // An empty chart still renders (axes, no series).
  bench::Chart empty;
  empty.title = "nothing";
  EXPECT_EQ(bench::render_chart(empty, 400, 300).width, 400);
}

TEST(BenchProgress, PlainLinesOffATerminal) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  bench::BenchProgress p(f, false, 3);
  p.next("decode nosa B=1");
  p.clear();
  p.next("decode nosa B=2");
  p.finish();
  std::rewind(f);
  std::string text;
  for (int c; (c = std::fgetc(f)) != EOF;) text += char(c);
  std::fclose(f);
  EXPECT_EQ(text.find('\r'), std::string::npos);
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 3) << text;
  EXPECT_NE(text.find("[bench] 1/3 decode nosa B=1 (elapsed "), std::string::npos) << text;
  EXPECT_NE(text.find("[bench] 2 configurations in "), std::string::npos) << text;
  EXPECT_EQ(p.line(3, "x", 10.0), "[bench] 3/3 x (elapsed 10.0s, ~5.0s left)");
}

TEST(BenchCommand, UnknownSuiteIsAClearError) {
  auto r = run_command(fmt::format("{} bench --suite nope --device cpu", nosa_binary()));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("unknown suite"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace nosa::test
