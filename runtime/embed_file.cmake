# Writes a C++ source defining `const std::string& <FUNC>()` that returns the bytes of INPUT.
file(READ "${INPUT}" hex HEX)
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "'\\\\x\\1'," bytes "${hex}")
file(WRITE "${OUTPUT}"
  "// Generated from ${NAME}; do not edit.\n#include <string>\n"
  "namespace nosa::runtime {\nnamespace { const char k_data[] = {${bytes} 0}; }\n"
  "const std::string& ${FUNC}() {\n"
  "  static const std::string text(k_data, sizeof(k_data) - 1);\n  return text;\n}\n}\n")
