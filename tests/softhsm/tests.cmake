# Integration tests: the real agent and smimectl against a SoftHSM token.
# One ctest per module; each builds its own fixture (fixture.sh) and agent in
# a fresh temporary directory, so they run in parallel (ctest -j).
# Python 3 standard library only; gpgsm and gpg-agent for test_mime.
find_program(SMIME_PYTHON3 NAMES python3 REQUIRED)

set(_softhsm_dir ${CMAKE_CURRENT_LIST_DIR})

# test_slotevents: SoftHSM behind a module that adds C_WaitForSlotEvent
# (slotevents.c says why no real module can be used). Tests only.
add_library(smime-test-slotevents MODULE ${_softhsm_dir}/slotevents.c)
target_link_libraries(smime-test-slotevents PRIVATE PkgConfig::P11KIT ${CMAKE_DL_LIBS})
set_target_properties(smime-test-slotevents PROPERTIES PREFIX "")
# name  timeout (s)
set(_softhsm_tests
  sign 300
  mime 300
  errors 300
  pin 300
  protocol 600
  large 900
  decrypt 600
  verify 600
  encrypt 600
  addressbook 300
  authz 300
  systemd 300
  spy 300
  cache 300
  hotplug 600
  remote 600
  always_auth 300
  pinpad 300
  revocation 600
  slotevents 300
  load64 400
  pinentry 300)
if(SMIME_SANITIZE)
  set(_softhsm_sanitize 1)
else()
  set(_softhsm_sanitize 0)
endif()

# A PIN pad reader cannot exist on a CI machine: test_pinpad loads SoftHSM
# through this stand-in module (tests/softhsm/pinpad.c says what it does).
add_library(test_pinpad MODULE ${_softhsm_dir}/pinpad.c)
target_link_libraries(test_pinpad PRIVATE ${CMAKE_DL_LIBS})
target_include_directories(test_pinpad PRIVATE ${P11KIT_INCLUDE_DIRS})
set_target_properties(test_pinpad PROPERTIES PREFIX "")

list(LENGTH _softhsm_tests _n)
math(EXPR _last "${_n} - 1")
foreach(_i RANGE 0 ${_last} 2)
  math(EXPR _j "${_i} + 1")
  list(GET _softhsm_tests ${_i} _name)
  list(GET _softhsm_tests ${_j} _timeout)
  add_test(NAME softhsm_${_name}
    COMMAND ${SMIME_PYTHON3} -B ${_softhsm_dir}/test_${_name}.py)
  set_tests_properties(softhsm_${_name} PROPERTIES
    TIMEOUT ${_timeout}
    LABELS softhsm
    ENVIRONMENT "SMIME_BUILD_DIR=${CMAKE_BINARY_DIR};SMIME_AGENT_BIN=$<TARGET_FILE:smime-agent>;SMIMECTL_BIN=$<TARGET_FILE:smimectl>;SMIME_TEST_SANITIZE=${_softhsm_sanitize};SMIME_TEST_PINPAD=$<TARGET_FILE:test_pinpad>;SMIME_TEST_SLOTEVENTS_MODULE=$<TARGET_FILE:smime-test-slotevents>;PYTHONDONTWRITEBYTECODE=1")
endforeach()
# The longest ones first, so that ctest -j overlaps them with the rest.
set_tests_properties(softhsm_large PROPERTIES COST 100)
set_tests_properties(softhsm_protocol PROPERTIES COST 50)
set_tests_properties(softhsm_load64 PROPERTIES COST 60)

# The audits of issue 5 over a large part of the integration suite (each
# module starts its own agents; harness.py wraps every one of them):
# - softhsm_spy_suite: every agent behind pkcs11-spy, and its log must show
#   no private key material read, wrapped, copied or made extractable;
# - softhsm_valgrind_suite (build without sanitizers only): every agent
#   under valgrind memcheck, no error and no definite/indirect leak.
set(_audit_modules test_sign test_mime test_errors test_pin test_protocol test_authz test_decrypt test_always_auth)
add_test(NAME softhsm_spy_suite
  COMMAND ${SMIME_PYTHON3} -B -m unittest ${_audit_modules}
  WORKING_DIRECTORY ${_softhsm_dir})
set_tests_properties(softhsm_spy_suite PROPERTIES
  TIMEOUT 900 LABELS "softhsm;audit" COST 40
  ENVIRONMENT "SMIME_TEST_SPY=1;SMIME_BUILD_DIR=${CMAKE_BINARY_DIR};SMIME_AGENT_BIN=$<TARGET_FILE:smime-agent>;SMIMECTL_BIN=$<TARGET_FILE:smimectl>;SMIME_TEST_SANITIZE=${_softhsm_sanitize};PYTHONDONTWRITEBYTECODE=1")
find_program(SMIME_VALGRIND valgrind)
if(SMIME_VALGRIND AND NOT SMIME_SANITIZE)
  add_test(NAME softhsm_valgrind_suite
    COMMAND ${SMIME_PYTHON3} -B -m unittest ${_audit_modules}
    WORKING_DIRECTORY ${_softhsm_dir})
  set_tests_properties(softhsm_valgrind_suite PROPERTIES
    TIMEOUT 1800 LABELS "softhsm;audit" COST 200
    ENVIRONMENT "SMIME_VALGRIND=1;SMIME_BUILD_DIR=${CMAKE_BINARY_DIR};SMIME_AGENT_BIN=$<TARGET_FILE:smime-agent>;SMIMECTL_BIN=$<TARGET_FILE:smimectl>;SMIME_TEST_SANITIZE=0;PYTHONDONTWRITEBYTECODE=1")
endif()
