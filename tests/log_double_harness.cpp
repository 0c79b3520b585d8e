// tests/test_log_double.py's harness: csrc/cpu/avx2_log_double.h alone, on the doubles of a file.
//   log_double_harness log|log1p IN OUT    (IN, OUT: raw native float64, a multiple of 4 values)
#include <cstdio>
#include <cstring>
#include <vector>

#include "avx2_log_double.h"

int main(int argc, char** argv) {
  if (argc != 4) return 2;
  const bool log1p = std::strcmp(argv[1], "log1p") == 0;
  std::FILE* in = std::fopen(argv[2], "rb");
  if (!in) return 2;
  std::vector<double> values;
  double v;
  while (std::fread(&v, sizeof v, 1, in) == 1) values.push_back(v);
  std::fclose(in);
  if (values.size() % 4 != 0) return 2;
  std::vector<double> out(values.size());
  for (size_t i = 0; i < values.size(); i += 4) {
    const __m256d x = _mm256_loadu_pd(values.data() + i);
    _mm256_storeu_pd(out.data() + i, log1p ? vae_fast::avx2_log_double::log1p(x) : vae_fast::avx2_log_double::log(x));
  }
  std::FILE* o = std::fopen(argv[3], "wb");
  if (!o || std::fwrite(out.data(), sizeof(double), out.size(), o) != out.size()) return 2;
  std::fclose(o);
  return 0;
}
