#include "core/npy.h"

#include "core/file.h"

#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace pkv {

static void write_npy_raw(const std::string& path, const void* data, size_t elem, const char* descr,
                          const std::vector<int64_t>& shape) {
  std::ostringstream hdr;
  hdr << "{'descr': '" << descr << "', 'fortran_order': False, 'shape': (";
  size_t n = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    hdr << shape[i] << (shape.size() == 1 ? "," : (i + 1 < shape.size() ? ", " : ""));
    n *= size_t(shape[i]);
  }
  hdr << "), }";
  std::string h = hdr.str();
  size_t total = 10 + h.size() + 1;
  h.append((64 - total % 64) % 64, ' ');
  h.push_back('\n');
  std::ofstream f(path, std::ios::binary);
  if (!f) fail(path, "cannot open for writing");
  f.write("\x93NUMPY\x01\x00", 8);
  uint16_t len = uint16_t(h.size());
  f.write(reinterpret_cast<const char*>(&len), 2);
  f.write(h.data(), std::streamsize(h.size()));
  f.write(static_cast<const char*>(data), std::streamsize(n * elem));
  if (!f) fail(path, "write failed");
}

void write_npy(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
  write_npy_raw(path, data, 4, "<f4", shape);
}
void write_npy_i32(const std::string& path, const int32_t* data, const std::vector<int64_t>& shape) {
  write_npy_raw(path, data, 4, "<i4", shape);
}

int64_t NpyArray::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

NpyArray read_npy(const std::string& path) {
  std::istringstream f(read_file(path, ".npy file"));
  char magic[8];
  f.read(magic, 8);
  if (!f || std::memcmp(magic, "\x93NUMPY", 6) != 0) fail(path, "not a .npy file (bad magic)");
  uint32_t hlen = 0;
  if (magic[6] == 1) {
    uint16_t l;
    f.read(reinterpret_cast<char*>(&l), 2);
    hlen = l;
  } else {
    f.read(reinterpret_cast<char*>(&hlen), 4);
  }
  std::string h(hlen, '\0');
  f.read(h.data(), hlen);
  if (!f) fail(path, "truncated .npy header");
  auto field = [&](const std::string& key) {
    size_t p = h.find("'" + key + "'");
    if (p == std::string::npos) fail(path, "npy header lacks " + key);
    return h.substr(h.find(':', p) + 1);
  };
  std::string descr = field("descr");
  descr = descr.substr(descr.find('\'') + 1);
  descr = descr.substr(0, descr.find('\''));
  if (field("fortran_order").find("True") < field("fortran_order").find(',')) fail(path, "fortran order unsupported");
  std::string shp = field("shape");
  shp = shp.substr(shp.find('(') + 1);
  shp = shp.substr(0, shp.find(')'));
  NpyArray a;
  std::stringstream ss(shp);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    if (tok.find_first_not_of(" ") == std::string::npos) continue;
    a.shape.push_back(std::stoll(tok));
  }
  const int64_t n = a.numel();
  a.data.resize(size_t(n));
  auto read_as = [&](auto tag) {
    using T = decltype(tag);
    std::vector<T> tmp(static_cast<size_t>(n));
    f.read(reinterpret_cast<char*>(tmp.data()), std::streamsize(n * sizeof(T)));
    if (!f) fail(path, "truncated .npy data");
    for (int64_t i = 0; i < n; ++i) a.data[size_t(i)] = float(tmp[size_t(i)]);
  };
  if (descr == "<f4") read_as(float{});
  else if (descr == "<f8") read_as(double{});
  else if (descr == "<i4") read_as(int32_t{});
  else if (descr == "<i8") read_as(int64_t{});
  else fail(path, "unsupported npy dtype " + descr);
  return a;
}

}  // namespace pkv
