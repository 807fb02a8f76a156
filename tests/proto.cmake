# Unit tests of the wire protocol layer (proto/): framing, fields, limits,
# malformed input and a randomized robustness test. No PKCS#11, no OpenSSL.
add_executable(test_proto ${CMAKE_CURRENT_SOURCE_DIR}/test_proto.c)
target_link_libraries(test_proto PRIVATE smime_proto)
add_test(NAME proto_unit COMMAND test_proto)
set_tests_properties(proto_unit PROPERTIES TIMEOUT 120)
