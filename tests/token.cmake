# token/ against a throwaway SoftHSM token made by tests/softhsm/fixture.sh.
add_executable(test_token ${CMAKE_CURRENT_SOURCE_DIR}/test_token.c)
target_link_libraries(test_token PRIVATE smime_token PkgConfig::CRYPTO Threads::Threads)

set(_token_fixture ${CMAKE_CURRENT_BINARY_DIR}/fixture-token)
add_test(NAME token_softhsm
  COMMAND sh -c "rm -rf '${_token_fixture}' && '${CMAKE_CURRENT_SOURCE_DIR}/softhsm/fixture.sh' '${_token_fixture}' >/dev/null && SOFTHSM2_CONF='${_token_fixture}/softhsm2.conf' \"$0\" '${_token_fixture}'"
          $<TARGET_FILE:test_token>)
set_tests_properties(token_softhsm PROPERTIES TIMEOUT 300)
# Under the sanitizers: third-party leaks are suppressed by tests/lsan.supp,
# whose entries name frames inside the module; the slow unwinder is needed to
# see those frames through libcrypto, which has no frame pointers.
set(_token_san_env)
if(SMIME_SANITIZE)
  set(_token_san_env
    "ASAN_OPTIONS=fast_unwind_on_malloc=0"
    "LSAN_OPTIONS=suppressions=${CMAKE_CURRENT_SOURCE_DIR}/lsan.supp:print_suppressions=0")
  set_property(TEST token_softhsm APPEND PROPERTY ENVIRONMENT ${_token_san_env})
endif()

# The same checks through OpenSC's pkcs11-spy, whose log then shows every call
# token/ made: no sensitive attribute of a private key, no C_WrapKey or
# C_CopyObject, one C_Login per login, pooled sessions. Own fixture directory
# so the two tests can run in parallel.
set(_token_spy /usr/lib/x86_64-linux-gnu/pkcs11-spy.so)
if(EXISTS ${_token_spy})
  set(_token_fixture_spy ${CMAKE_CURRENT_BINARY_DIR}/fixture-token-spy)
  add_test(NAME token_softhsm_spy
    COMMAND sh -c "rm -rf '${_token_fixture_spy}' && '${CMAKE_CURRENT_SOURCE_DIR}/softhsm/fixture.sh' '${_token_fixture_spy}' >/dev/null && SOFTHSM2_CONF='${_token_fixture_spy}/softhsm2.conf' \"$0\" '${_token_fixture_spy}' --spy"
            $<TARGET_FILE:test_token>)
  set_tests_properties(token_softhsm_spy PROPERTIES TIMEOUT 300)
  if(_token_san_env)
    set_property(TEST token_softhsm_spy APPEND PROPERTY ENVIRONMENT ${_token_san_env})
  endif()
endif()
