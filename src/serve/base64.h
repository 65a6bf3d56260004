// Base64 (RFC 4648, standard alphabet) for image data: URIs.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace pkv::serve {

// Decodes standard base64. Padding is optional; ASCII whitespace (line breaks in wrapped encoders'
// output) is skipped. nullopt for any other character, a misplaced '=', or a length that no
// encoding produces.
std::optional<std::vector<uint8_t>> base64_decode(std::string_view in);
std::string base64_encode(const uint8_t* data, size_t size);

}  // namespace pkv::serve
