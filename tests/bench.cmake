# The quick variant of the benchmark harness (bench/run --quick): seconds,
# no speed target asserted, but every tool must run and every signature it
# makes must verify, so that the harness cannot rot.
add_test(NAME bench_quick
  COMMAND ${CMAKE_SOURCE_DIR}/bench/run --quick --build ${CMAKE_BINARY_DIR}
          --out ${CMAKE_BINARY_DIR}/bench-quick)
set_tests_properties(bench_quick PROPERTIES TIMEOUT 300 LABELS bench
  ENVIRONMENT "AGENT_BIN=$<TARGET_FILE:smime-agent>")
