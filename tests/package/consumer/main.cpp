#include <compact/compact.hpp>
#include <cstdio>
int main() { std::printf("compact %s\n", COMPACT_VERSION_STRING); return 0; }
