// npy.hpp: read and write NumPy .npy files and uncompressed .npz archives (numpy.savez), no dependencies.
//
// .npz is a zip of .npy members. numpy.savez stores them uncompressed (with zip64 extra fields), which this reads
// and writes; numpy.savez_compressed deflates them, which would need zlib: such members are refused with a message.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "edge_sparse.hpp"

namespace edge_sparse {
namespace npy {

struct Array {
  std::string dtype;  // numpy name: float32, int64, bool, ...
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;  // C order, little endian
};

inline const std::map<std::string, std::string>& descr_to_dtype() {
  static const std::map<std::string, std::string> m = {
      {"<f4", "float32"}, {"<f2", "float16"}, {"<f8", "float64"}, {"|i1", "int8"},  {"<i2", "int16"},
      {"<i4", "int32"},   {"<i8", "int64"},   {"|u1", "uint8"},   {"<u2", "uint16"}, {"<u4", "uint32"},
      {"<u8", "uint64"},  {"|b1", "bool"}};
  return m;
}

inline std::string dtype_to_descr(const std::string& dtype) {
  for (const auto& kv : descr_to_dtype())
    if (kv.second == dtype) return kv.first;
  throw Error("cannot write dtype " + dtype + " to .npy");
}

inline size_t itemsize(const std::string& dtype) {
  return static_cast<size_t>((detail::parse_dtype(dtype, "array").bits + 7) / 8);
}

// Value of a key in the header dict: {'descr': '<f4', 'fortran_order': False, 'shape': (1, 3), }
inline std::string header_field(const std::string& header, const std::string& key, const std::string& origin) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) throw Error(origin + ": .npy header lacks '" + key + "'");
  size_t colon = header.find(':', k);
  size_t start = header.find_first_not_of(' ', colon + 1);
  if (header[start] == '(') return header.substr(start + 1, header.find(')', start) - start - 1);
  if (header[start] == '\'') return header.substr(start + 1, header.find('\'', start + 1) - start - 1);
  size_t end = header.find_first_of(",}", start);
  return header.substr(start, end - start);
}

inline Array parse(const uint8_t* p, size_t n, const std::string& origin) {
  static const char magic[] = "\x93NUMPY";
  if (n < 10 || std::memcmp(p, magic, 6) != 0) throw Error(origin + " is not a .npy file");
  uint8_t major = p[6];
  size_t header_len, offset;
  if (major == 1) {
    header_len = p[8] | (p[9] << 8);
    offset = 10;
  } else {
    if (n < 12) throw Error(origin + " is truncated");
    header_len = p[8] | (p[9] << 8) | (size_t(p[10]) << 16) | (size_t(p[11]) << 24);
    offset = 12;
  }
  if (offset + header_len > n) throw Error(origin + " is truncated");
  std::string header(reinterpret_cast<const char*>(p + offset), header_len);
  Array a;
  std::string descr = header_field(header, "descr", origin);
  auto it = descr_to_dtype().find(descr);
  if (it == descr_to_dtype().end())
    throw Error(origin + " has dtype '" + descr + "', which is not supported (little-endian numeric or bool only)");
  a.dtype = it->second;
  if (header_field(header, "fortran_order", origin) != "False")
    throw Error(origin + " is Fortran-ordered; save it with np.ascontiguousarray(x)");
  std::stringstream shape(header_field(header, "shape", origin));
  std::string dim;
  while (std::getline(shape, dim, ','))
    if (dim.find_first_not_of(' ') != std::string::npos) a.shape.push_back(std::stoll(dim));
  size_t count = 1;
  for (int64_t d : a.shape) count *= static_cast<size_t>(d);
  size_t bytes = count * itemsize(a.dtype);
  if (offset + header_len + bytes > n) throw Error(origin + " is truncated (expected " + std::to_string(bytes) + " data bytes)");
  a.data.assign(p + offset + header_len, p + offset + header_len + bytes);
  return a;
}

inline std::vector<uint8_t> serialize(const Array& a) {
  std::string shape;  // "()", "(3,)", "(2, 3)"
  for (size_t i = 0; i < a.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(a.shape[i]);
  if (a.shape.size() == 1) shape += ",";
  std::string header = "{'descr': '" + dtype_to_descr(a.dtype) + "', 'fortran_order': False, 'shape': (" + shape + "), }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::vector<uint8_t> out = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0,
                              static_cast<uint8_t>(header.size() & 0xFF), static_cast<uint8_t>(header.size() >> 8)};
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), a.data.begin(), a.data.end());
  return out;
}

inline std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read " + path);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

inline void write_file(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw Error("cannot write " + path);
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (!f) throw Error("writing " + path + " failed (disk full?)");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw Error("cannot rename " + tmp + " to " + path);
}

inline Array load(const std::string& path) {
  std::vector<uint8_t> bytes = read_file(path);
  return parse(bytes.data(), bytes.size(), path);
}

inline void save(const std::string& path, const Array& a) { write_file(path, serialize(a)); }

// ------------------------------------------------------------------------------------------------ .npz (zip)
namespace zip {

inline uint32_t u16(const uint8_t* p) { return p[0] | (p[1] << 8); }
inline uint32_t u32(const uint8_t* p) { return p[0] | (p[1] << 8) | (p[2] << 16) | (uint32_t(p[3]) << 24); }
inline uint64_t u64(const uint8_t* p) { return u32(p) | (uint64_t(u32(p + 4)) << 32); }

inline uint32_t crc32(const uint8_t* p, size_t n) {
  static uint32_t table[256];
  static bool ready = false;
  if (!ready) {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    ready = true;
  }
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

inline void put16(std::vector<uint8_t>& o, uint32_t v) {
  o.push_back(v & 0xFF);
  o.push_back((v >> 8) & 0xFF);
}
inline void put32(std::vector<uint8_t>& o, uint32_t v) {
  put16(o, v & 0xFFFF);
  put16(o, v >> 16);
}

}  // namespace zip

/*! \brief Members of an .npz by key (member name without ".npy"). */
inline std::map<std::string, Array> load_npz(const std::string& path) {
  using namespace zip;
  std::vector<uint8_t> b = read_file(path);
  size_t n = b.size();
  if (n < 22) throw Error(path + " is not a zip (.npz) file");
  size_t eocd = std::string::npos;
  for (size_t i = n - 22 + 1; i-- > 0 && n - i <= 22 + 65535;)
    if (u32(&b[i]) == 0x06054b50) {
      eocd = i;
      break;
    }
  if (eocd == std::string::npos) throw Error(path + " is not a zip (.npz) file");
  uint64_t entries = u16(&b[eocd + 10]);
  uint64_t cd = u32(&b[eocd + 16]);
  if (cd == 0xFFFFFFFFu || entries == 0xFFFF) {  // zip64 end of central directory
    if (eocd < 20 || u32(&b[eocd - 20]) != 0x07064b50) throw Error(path + ": bad zip64 directory");
    uint64_t z64 = u64(&b[eocd - 20 + 8]);
    entries = u64(&b[z64 + 32]);
    cd = u64(&b[z64 + 48]);
  }
  std::map<std::string, Array> out;
  size_t p = cd;
  for (uint64_t e = 0; e < entries; ++e) {
    if (p + 46 > n || u32(&b[p]) != 0x02014b50) throw Error(path + ": corrupt zip directory");
    uint32_t method = u16(&b[p + 10]);
    uint64_t csize = u32(&b[p + 20]), usize = u32(&b[p + 24]);
    uint32_t name_len = u16(&b[p + 28]), extra_len = u16(&b[p + 30]), comment_len = u16(&b[p + 32]);
    uint64_t local = u32(&b[p + 42]);
    std::string name(reinterpret_cast<const char*>(&b[p + 46]), name_len);
    // zip64 extra: the fields that are 0xFFFFFFFF above follow in order (usize, csize, local offset)
    size_t x = p + 46 + name_len, xend = x + extra_len;
    while (x + 4 <= xend) {
      uint32_t id = u16(&b[x]), len = u16(&b[x + 2]);
      if (id == 0x0001) {
        size_t q = x + 4;
        if (usize == 0xFFFFFFFFu) { usize = u64(&b[q]); q += 8; }
        if (csize == 0xFFFFFFFFu) { csize = u64(&b[q]); q += 8; }
        if (local == 0xFFFFFFFFu) { local = u64(&b[q]); q += 8; }
      }
      x += 4 + len;
    }
    p += 46 + name_len + extra_len + comment_len;
    if (method != 0)
      throw Error(path + ": member " + name + " is compressed; save inputs with np.savez (not savez_compressed)");
    if (local + 30 > n || u32(&b[local]) != 0x04034b50) throw Error(path + ": corrupt zip member " + name);
    size_t data = local + 30 + u16(&b[local + 26]) + u16(&b[local + 28]);
    if (data + csize > n) throw Error(path + ": truncated zip member " + name);
    std::string key = name.size() > 4 && name.compare(name.size() - 4, 4, ".npy") == 0 ? name.substr(0, name.size() - 4) : name;
    out[key] = parse(&b[data], static_cast<size_t>(csize), path + ":" + name);
  }
  return out;
}

/*! \brief Write an uncompressed .npz (np.load reads it); arrays under 4 GiB each. */
inline void save_npz(const std::string& path, const std::vector<std::pair<std::string, Array>>& arrays) {
  using namespace zip;
  std::vector<uint8_t> out, dir;
  for (const auto& kv : arrays) {
    std::vector<uint8_t> body = serialize(kv.second);
    std::string name = kv.first + ".npy";
    uint32_t crc = crc32(body.data(), body.size());
    uint32_t offset = static_cast<uint32_t>(out.size());
    auto header = [&](std::vector<uint8_t>& o, bool central) {
      put32(o, central ? 0x02014b50 : 0x04034b50);
      if (central) put16(o, 20);  // version made by
      put16(o, 20);               // version needed
      put16(o, 0);                // flags
      put16(o, 0);                // stored
      put16(o, 0);                // time
      put16(o, 0x21);             // date (1980-01-01)
      put32(o, crc);
      put32(o, static_cast<uint32_t>(body.size()));
      put32(o, static_cast<uint32_t>(body.size()));
      put16(o, static_cast<uint32_t>(name.size()));
      put16(o, 0);  // extra
      if (central) {
        put16(o, 0);  // comment
        put16(o, 0);  // disk
        put16(o, 0);  // internal attrs
        put32(o, 0);  // external attrs
        put32(o, offset);
      }
      o.insert(o.end(), name.begin(), name.end());
    };
    header(out, false);
    out.insert(out.end(), body.begin(), body.end());
    header(dir, true);
  }
  uint32_t cd = static_cast<uint32_t>(out.size());
  out.insert(out.end(), dir.begin(), dir.end());
  put32(out, 0x06054b50);
  put16(out, 0);
  put16(out, 0);
  put16(out, static_cast<uint32_t>(arrays.size()));
  put16(out, static_cast<uint32_t>(arrays.size()));
  put32(out, static_cast<uint32_t>(dir.size()));
  put32(out, cd);
  put16(out, 0);
  write_file(path, out);
}

}  // namespace npy
}  // namespace edge_sparse
